"""Atomic artifact I/O: every file or folder appears whole or not at all.

A run killed at any instant leaves only complete artifacts plus `*.tmp` leftovers, which the next
write replaces. That is what lets a resumed run trust "the artifact exists" as "the step finished".
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder under a temporary name with `fill(tmp)`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class RunDir:
    """runs/<name>/: `round_<k>/` folders whose `<step>.json` summaries mark finished steps."""

    def __init__(self, path: Path, rounds: int):
        self.path = Path(path)
        self.rounds = rounds

    def round(self, k: int) -> Path:
        return self.path / f"round_{k}"

    def done(self, k: int, step: str) -> bool:
        return (self.round(k) / f"{step}.json").exists()

    def latest_with(self, name: str, before: int | None = None) -> int:
        """The newest round (< before) holding `name`; 0 when none does."""
        last = before if before is not None else self.rounds + 1
        return next((k for k in range(last - 1, 0, -1) if (self.round(k) / name).exists()), 0)
