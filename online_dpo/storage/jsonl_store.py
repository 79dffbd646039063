"""An append-only JSONL key -> value store, so what a killed run already paid for stays paid for.

One line per entry, {"key": ..., "value": ...}; a later line for the same key wins. A process
killed mid-append leaves at most a torn last line: loading skips it (and any other line that does
not parse), and the next append starts on a fresh line so the torn bytes never swallow a good
entry. Appends are thread-safe, and each is one O_APPEND write, so processes sharing one file
(a sweep over one reference cache) do not interleave lines. `path=None` keeps everything in
memory. Used by the judge cache and the reference log-prob cache: imports nothing from
online_dpo or judges.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class JsonlStore:
    def __init__(self, path: str | os.PathLike | None, value_field: str = "value"):
        self.path = Path(path) if path is not None else None
        self.value_field = value_field  # the ref cache's files name it "logp"
        self.skipped = 0  # lines that did not parse: a torn last line
        self._data: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._torn_tail = False
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        self._torn_tail = bool(raw) and not raw.endswith(b"\n")
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key, value = entry["key"], entry[self.value_field]
            except (ValueError, KeyError, TypeError):
                self.skipped += 1
                continue
            self._data[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def put(self, key: str, value: Any) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        if not pairs:
            return
        # Serialized before anything is kept: a value JSON cannot hold fails here, changing nothing.
        data = "".join(json.dumps({"key": k, self.value_field: v}) + "\n" for k, v in pairs).encode()
        with self._lock:
            if self.path is not None:
                self._append(b"\n" + data if self._torn_tail else data)
                self._torn_tail = False
            self._data.update(pairs)

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
