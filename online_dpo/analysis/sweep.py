"""Seeds and sweeps: a grid of recipe overrides times seeds, each cell an ordinary resumable run.

    online-dpo sweep SWEEP.yaml [--dry-run]
    online-dpo run RECIPE.yaml --seeds 0,1,2 [key=value ...]     # a sweep with an empty grid

A sweep file names a base recipe (relative to the sweep file), overrides for every cell, a grid
`dotted.key: [values]` (cartesian product) and seeds. An arm is one combination of grid values;
its name derives from those values alone (`loss.beta=0.1,train.epochs=2`), so every seed of an arm
shares it. A cell is an arm and a seed, run as `<output_dir>/<sweep>/<arm>__seed<k>`
(`<output_dir>/<sweep>/seed<k>` for an empty grid).

Every cell's recipe is validated before any cell runs. Cells then run one after another, seed-major
(every arm's seed 0 first, so a partial sweep already compares every arm), each in a fresh process
(`python -m online_dpo.cli run BASE key=value ... name=<cell> seed=<k>`): a vLLM engine, CUDA
memory and accelerate's process state never leak from one cell into the next. A finished cell is
skipped; an interrupted one resumes like any run. A failed cell stops the sweep, naming it.

`<output_dir>/<sweep>/sweep.json` (rewritten atomically after every change) lists every cell:
name, run_dir, arm (grid values), arm_label, arm_key, seed, status (pending / running / finished /
failed) and exit_code. `arm_of(run_dir)` groups any run, swept or not, by its recipe.yaml.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from online_dpo.config.recipe import (
    Int,
    RecipeError,
    Section,
    Str,
    _recipe_error,
    load_recipe,
    read_yaml,
    recipe_from_dict,
    recipe_to_dict,
)
from online_dpo.faults import cell_env
from online_dpo.storage.artifacts import read_json, write_json

__all__ = ["SweepConfig", "Cell", "Plan", "arm_of", "arm_key", "load_sweep", "plan_sweep", "plan_seeds",
           "run_sweep", "cell_finished", "parse_seeds"]

RESERVED = {"name": "the sweep names each cell", "seed": "use seeds:",
            "output_dir": "every cell of a sweep shares one output_dir; set it in overrides"}
NOT_IN_ARM = ("name", "seed", "output_dir")  # what two runs of one arm may differ in
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
MAX_ARM_NAME = 120


def _problem(message: str) -> PydanticCustomError:
    return PydanticCustomError("recipe", "{message}", {"message": message})


def _yaml_value(value: Any) -> str:
    """A value as the text of a `key=value` override that reads back (yaml.safe_load) as itself."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return text[:-3].strip() if text.endswith("\n...") else text


def _override_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


class SweepConfig(Section):
    """A sweep file. Frozen, unknown keys refused, like a recipe's sections."""

    name: Str
    """The sweep's name: its cells run under <output_dir>/<name>/."""
    base: Str
    """The base recipe, relative to the sweep file."""
    overrides: list[Str] = Field(default_factory=list)
    """`key=value` overrides for every cell (a list of strings or a mapping)."""
    grid: dict[Str, list[Any]] = Field(default_factory=dict)
    """`dotted.key: [values]`: one arm per combination of values (cartesian product)."""
    seeds: list[Int] = Field(default_factory=lambda: [0], min_length=1)
    """One cell per arm and seed."""

    @field_validator("overrides", mode="before")
    @classmethod
    def _overrides_mapping(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return [f"{key}={_yaml_value(v)}" for key, v in value.items()]
        return value

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if not _NAME.fullmatch(self.name):
            raise _problem(f"name: {self.name!r} is not a safe folder name (letters, digits, . _ -)")
        for item in self.overrides:
            if "=" not in item:
                raise _problem(f"overrides: {item!r} is not of the form key=value")
            key = _override_key(item)
            if key in ("name", "seed"):
                raise _problem(f"overrides: {key} cannot be overridden in a sweep ({RESERVED[key]})")
        for key, values in self.grid.items():
            if key in RESERVED:
                raise _problem(f"grid.{key}: cannot be swept ({RESERVED[key]})")
            if not values:
                raise _problem(f"grid.{key}: needs at least one value")
            texts = [_yaml_value(v) for v in values]
            if len(set(texts)) < len(texts):
                raise _problem(f"grid.{key}: repeated value in {values}")
        if len(set(self.seeds)) < len(self.seeds):
            raise _problem(f"seeds: repeated seed in {self.seeds}")
        return self


@dataclass(frozen=True)
class Cell:
    name: str  # the run's name: <sweep>/<arm>__seed<k>
    arm: dict  # grid key -> value
    arm_label: str
    seed: int
    overrides: tuple[str, ...]  # everything after the base recipe on the cell's command line
    run_dir: Path
    rounds: int
    arm_key: str = ""


@dataclass(frozen=True)
class Plan:
    sweep: SweepConfig
    base: Path
    sweep_file: Path | None
    dir: Path  # <output_dir>/<sweep>
    cells: tuple[Cell, ...]

    def command(self, cell: Cell) -> list[str]:
        return [sys.executable, "-m", "online_dpo.cli", "run", str(self.base), *cell.overrides]


# ---------------------------------------------------------------------------- planning


def _label_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    else:
        text = value if isinstance(value, str) else _yaml_value(value)  # true, null, 0.1, 1e-05
    return "-".join(p for p in _UNSAFE.split(text) if p) or "-"  # {"max_words":5} -> max_words-5


def arm_name(arm: dict) -> str:
    """Readable and filesystem-safe; derived from the grid values alone ("" for an empty grid)."""
    label = ",".join(f"{_UNSAFE.sub('-', key)}={_label_value(value)}" for key, value in arm.items())
    if len(label) > MAX_ARM_NAME:
        digest = hashlib.sha256(json.dumps(arm, sort_keys=True, default=str).encode()).hexdigest()[:10]
        label = f"{label[:MAX_ARM_NAME - 11]}-{digest}"
    return label


def arm_key(recipe: dict) -> str:
    """What makes two runs one arm: their whole recipe but name, seed and output_dir."""
    kept = {k: v for k, v in recipe.items() if k not in NOT_IN_ARM}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping, got {type(data).__name__}")
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: {_recipe_error(e)}") from None


def plan_sweep(path: str | Path) -> Plan:
    path = Path(path)
    sweep = load_sweep(path)
    return _plan(sweep, Path(os.path.normpath(path.parent / sweep.base)), path)


def plan_seeds(recipe_path: str | Path, overrides: list[str], seeds: list[int]) -> Plan:
    """`run RECIPE --seeds ...`: a sweep named after the run, with an empty grid."""
    name = load_recipe(recipe_path, overrides).name
    if any(_override_key(o) == "seed" for o in overrides):
        raise RecipeError("seed=...: --seeds sets each run's seed")
    try:
        sweep = SweepConfig(name=name, base=str(recipe_path), seeds=seeds,
                            overrides=[o for o in overrides if _override_key(o) != "name"])
    except ValidationError as e:
        raise RecipeError(f"--seeds: {_recipe_error(e)}") from None
    return _plan(sweep, Path(recipe_path), None)


def _plan(sweep: SweepConfig, base: Path, sweep_file: Path | None) -> Plan:
    """Expand the grid and validate every cell's recipe before anything runs."""
    where = f"sweep {sweep.name}"
    if not base.is_file():
        raise RecipeError(f"{where}: base recipe not found: {base}")
    arms = [dict(zip(sweep.grid, values, strict=True)) for values in itertools.product(*sweep.grid.values())]
    cells, names, out_dirs = [], {}, set()
    for seed in sweep.seeds:  # seed-major: every arm's first seed before any arm's second
        for arm in arms:
            label = arm_name(arm)
            name = f"{sweep.name}/{label}__seed{seed}" if label else f"{sweep.name}/seed{seed}"
            if name in names:
                raise RecipeError(f"{where}: arms {names[name]} and {arm} both get the folder name {name}")
            names[name] = arm
            overrides = (*sweep.overrides, *(f"{k}={_yaml_value(v)}" for k, v in arm.items()),
                         f"name={name}", f"seed={seed}")
            try:
                recipe = load_recipe(base, list(overrides))
            except RecipeError as e:
                raise RecipeError(f"{where}: cell {name}: {e}") from None
            # The key of the recipe.yaml the run will write (a YAML round trip, as arm_of reads it).
            resolved = yaml.safe_load(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
            out_dirs.add(recipe.output_dir)
            cells.append(Cell(name, arm, label or sweep.name, seed, overrides, recipe.run_dir, recipe.rounds,
                              arm_key(resolved)))
    if len(out_dirs) != 1:
        raise RecipeError(f"{where}: cells disagree on output_dir: {sorted(out_dirs)}")
    sweep_dir = Path(out_dirs.pop()) / sweep.name
    if (sweep_dir / "recipe.yaml").exists():
        raise RecipeError(f"{where}: {sweep_dir} is a run's directory, not a sweep's; give the sweep "
                          "another name")
    return Plan(sweep, base, sweep_file, sweep_dir, tuple(cells))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise RecipeError("--seeds: no seed given")
    return seeds


# ---------------------------------------------------------------------------- running


def cell_finished(cell: Cell) -> bool:
    """Every round's metrics.json, and the run's metrics.jsonl (written when the run ends)."""
    return (cell.run_dir / "metrics.jsonl").exists() and all(
        (cell.run_dir / f"round_{k}" / "metrics.json").exists() for k in range(1, cell.rounds + 1))


def _manifest(plan: Plan, status: dict[str, str], codes: dict[str, int | None]) -> dict:
    sweep = plan.sweep
    return {
        "name": sweep.name, "sweep_file": str(plan.sweep_file) if plan.sweep_file else None,
        "base": str(plan.base), "overrides": list(sweep.overrides), "grid": dict(sweep.grid),
        "seeds": list(sweep.seeds),
        "cells": [{"name": c.name, "run_dir": str(c.run_dir), "arm": c.arm, "arm_label": c.arm_label,
                   "arm_key": c.arm_key, "seed": c.seed, "status": status[c.name],
                   "exit_code": codes.get(c.name)} for c in plan.cells],
    }


def _say(plan: Plan, text: str, err: bool = False) -> None:
    print(f"[online-dpo] sweep {plan.sweep.name}: {text}", file=sys.stderr if err else sys.stdout, flush=True)


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_sweep(plan: Plan, dry_run: bool = False) -> int:
    """Run every unfinished cell in order, each in its own process. 0 when all finished; 1 when a
    cell failed (the sweep stops there, naming it and its exit code)."""
    n = len(plan.cells)
    status = {c.name: "finished" if cell_finished(c) else "pending" for c in plan.cells}
    if dry_run:
        _say(plan, f"{n} cells ({len(plan.cells) // len(plan.sweep.seeds)} arms x "
                   f"{len(plan.sweep.seeds)} seeds), every recipe valid; nothing run")
        for cell in plan.cells:
            print(f"  {status[cell.name]:8} {cell.name}\n           {shlex.join(plan.command(cell))}")
        return 0
    codes: dict[str, int | None] = {}
    manifest = plan.dir / "sweep.json"
    write_json(manifest, _manifest(plan, status, codes))
    for i, cell in enumerate(plan.cells, start=1):
        if status[cell.name] == "finished":
            _say(plan, f"cell {i}/{n} {cell.name}: finished earlier, skipped")
            continue
        status[cell.name] = "running"
        write_json(manifest, _manifest(plan, status, codes))
        _say(plan, f"cell {i}/{n} {cell.name}: running {shlex.join(plan.command(cell))}")
        try:
            code = subprocess.run(plan.command(cell), env=cell_env(cell.name), check=False).returncode
        except KeyboardInterrupt:  # Ctrl-C reached the cell too; subprocess.run has reaped it
            code = -signal.SIGINT
        codes[cell.name] = code
        done = code == 0 and cell_finished(cell)
        status[cell.name] = "finished" if done else "failed"
        write_json(manifest, _manifest(plan, status, codes))
        if not done:
            why = _exit_reason(code) if code else "exit code 0 but its rounds are not all finished"
            _say(plan, f"cell {cell.name} failed ({why}); {i - 1} cells before it are kept, "
                       f"the sweep stops. Run it again to resume. ({manifest})", err=True)
            return 1
    _say(plan, f"all {n} cells finished; {manifest}")
    return 0


# ---------------------------------------------------------------------------- grouping runs


def _sweep_entry(run_dir: Path) -> dict | None:
    """The run's cell in the sweep.json of its parent folder, if it was launched by a sweep."""
    manifest = run_dir.parent / "sweep.json"
    if not manifest.is_file():
        return None
    try:
        cells = read_json(manifest).get("cells", [])
    except (ValueError, AttributeError):
        return None
    return next((c for c in cells if isinstance(c, dict) and Path(str(c.get("run_dir"))).name == run_dir.name),
                None)


def arm_of(run_dir: str | Path) -> tuple[str, str]:
    """(arm_key, arm_label) of a run, swept or not.

    arm_key hashes the run's recipe.yaml without name, seed and output_dir: runs with equal keys
    differ only in their seed. arm_label is for display: the sweep's arm name (e.g.
    "loss.beta=0.1") for a sweep's cell, else the run's folder name less a "seed<k>" suffix."""
    run_dir = Path(run_dir)
    path = run_dir / "recipe.yaml"
    recipe = read_yaml(path, "a run directory's recipe.yaml")  # RecipeError: a ValueError
    if not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a mapping")
    try:  # with the defaults of keys added since the run was written: it is the same recipe
        recipe = recipe_to_dict(recipe_from_dict(recipe))
    except RecipeError:
        pass  # a recipe of another version of online-dpo: compared as written
    entry = _sweep_entry(run_dir)
    if entry is not None and entry.get("arm_label"):
        label = str(entry["arm_label"])
    else:
        label = re.sub(r"(^|[_.-]+)seed\d+$", "", run_dir.name) or run_dir.resolve().parent.name
    return arm_key(recipe), label
