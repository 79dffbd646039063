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


def resolve_target(target: str) -> Any:
    """Import the object named by "pkg.mod:Name" (or "pkg.mod.Name")."""
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
