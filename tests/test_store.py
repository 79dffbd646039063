"""The append-only JSONL store behind the judge cache and the reference log-prob cache."""

import json
import threading

import pytest

from online_dpo.storage.jsonl_store import JsonlStore


def test_put_get_and_reload(tmp_path):
    path = tmp_path / "sub" / "store.jsonl"  # the folder is made on the first write
    store = JsonlStore(path)
    assert len(store) == 0 and "a" not in store and store.get("a") is None and store.get("a", 7) == 7
    store.put("a", {"preference": "first", "score": 1.5})
    store.put_many({"b": -0.1234567, "c": None})
    store.put_many([("a", [1, 2])])  # a later line for a key wins
    again = JsonlStore(path)
    assert len(again) == 3 and again.get("a") == [1, 2] and again.get("b") == -0.1234567
    assert "c" in again and again.get("c", "missing") is None
    assert len(path.read_text().splitlines()) == 4  # append-only: nothing is rewritten


def test_torn_last_line_is_skipped_and_the_next_append_survives(tmp_path):
    path = tmp_path / "store.jsonl"
    JsonlStore(path).put("a", 1)
    with path.open("a") as f:
        f.write('{"key": "b", "val')  # a process killed mid-append
    store = JsonlStore(path)
    assert len(store) == 1 and store.skipped == 1
    store.put("c", 3)  # starts on a fresh line, not glued onto the torn bytes
    again = JsonlStore(path)
    assert (again.get("a"), again.get("c"), len(again), again.skipped) == (1, 3, 2, 1)


def test_in_memory_store_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = JsonlStore(None)
    store.put_many({"a": 1, "b": 2})
    assert len(store) == 2 and store.get("b") == 2 and list(tmp_path.iterdir()) == []


def test_custom_value_field_reads_existing_files(tmp_path):
    path = tmp_path / "logps.jsonl"
    path.write_text(json.dumps({"key": "k", "logp": -2.5}) + "\n")  # the ref cache's format
    store = JsonlStore(path, value_field="logp")
    assert store.get("k") == -2.5
    store.put("k2", -1.0)
    assert json.loads(path.read_text().splitlines()[-1]) == {"key": "k2", "logp": -1.0}


def test_unserializable_value_changes_nothing(tmp_path):
    store = JsonlStore(tmp_path / "store.jsonl")
    with pytest.raises(TypeError):
        store.put("a", object())
    assert len(store) == 0 and not (tmp_path / "store.jsonl").exists()


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    path = tmp_path / "store.jsonl"
    store = JsonlStore(path)

    def writer(t):
        for i in range(200):
            store.put(f"{t}-{i}", "x" * 500)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = JsonlStore(path)
    assert len(store) == len(again) == 1600 and again.skipped == 0
