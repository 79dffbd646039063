"""Resolve a judge named in a recipe ("module:Class" plus kwargs) before any model loads."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

from judges.protocol import PairwiseJudge, PointwiseAsPairwise, PointwiseJudge


class JudgeLoadError(ValueError):
    pass


ENTRY_POINT_GROUP = "online_dpo.judges"


def _entry_point(name: str) -> Any:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise JudgeLoadError(
            f"judge.target {name!r} is not of the form 'module:Class' and no installed package "
            f"registers it under the {ENTRY_POINT_GROUP!r} entry-point group (registered: {known})"
        )
    try:
        return found[0].load()
    except Exception as e:  # noqa: BLE001 - a broken plug-in package should name itself
        raise JudgeLoadError(f"judge entry point {name!r} ({found[0].value}) failed to load: {e}") from e


def resolve_target(target: str) -> Any:
    """Import the object named by "pkg.mod:Name" or "pkg.mod.Name", or a registered plug-in name."""
    if ":" not in target and "." not in target:
        return _entry_point(target)
    if ":" in target:
        module_name, _, attr = target.partition(":")
    else:
        module_name, _, attr = target.rpartition(".")
    if not module_name or not attr:
        raise JudgeLoadError(f"judge.target {target!r} is not of the form 'module:Class'")
    # A user's judge usually lives in a file next to where they launch the run.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise JudgeLoadError(f"judge.target {target!r}: cannot import module {e.name!r}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise JudgeLoadError(f"judge.target {target!r}: module {module_name!r} has no {attr!r}") from None


def check_kwargs(cls: Any, kwargs: dict[str, Any], target: str) -> None:
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise JudgeLoadError(f"judge.kwargs do not fit {target}: {e}") from None


def validate_judge_target(target: str, kwargs: dict[str, Any]) -> Any:
    """Check a judge can be built (import, class, signature) without building it."""
    cls = resolve_target(target)
    if not callable(cls):
        raise JudgeLoadError(f"judge.target {target!r} is not a class or factory")
    if inspect.isclass(cls) and not (
        callable(getattr(cls, "judge", None)) or callable(getattr(cls, "score", None))
    ):
        raise JudgeLoadError(
            f"judge.target {target!r} has neither judge(row, first, second) nor score(row, completion)"
        )
    check_kwargs(cls, kwargs, target)
    return cls


def build_judge(target: str, kwargs: dict[str, Any]) -> PairwiseJudge | PointwiseAsPairwise:
    """Build the judge; a pointwise judge is wrapped so it also answers pairwise questions."""
    cls = validate_judge_target(target, kwargs)
    judge = cls(**kwargs)
    if isinstance(judge, PointwiseJudge) and not isinstance(judge, PairwiseJudge):
        return PointwiseAsPairwise(judge)
    if isinstance(judge, PairwiseJudge):
        return judge
    raise JudgeLoadError(f"{target} built {type(judge).__name__}, which is not a judge")


def build_judge_stack(cfg, cache_path=None, base=None):
    """The recipe's judge behind its fault-tolerance and bias-control layers.

    Returns (judge for pair selection, pointwise scorer or None). The scorer skips BothOrders:
    a score does not depend on the order of anything. `base`: an instance of `cfg`'s judge built
    already (a second stack over one reward model holds it in memory once).
    """
    import json

    from judges.bias import BothOrders
    from judges.reliable import JudgeCache, ReliableJudge

    base = build_judge(cfg.target, cfg.kwargs) if base is None else base
    fingerprint = json.dumps([cfg.target, cfg.kwargs], sort_keys=True, default=str)
    concurrency = cfg.concurrency or getattr(base, "concurrency", 1)
    reliable = ReliableJudge(base, fingerprint=fingerprint, retries=cfg.retries,
                             timeout_s=cfg.timeout_s, backoff_s=cfg.backoff_s,
                             cache=JudgeCache(cache_path if cfg.cache else None), concurrency=concurrency)
    judge = BothOrders(reliable, cfg.disagreement) if cfg.both_orders else reliable
    return judge, (reliable if reliable.pointwise else None)
