"""report_to: the tiny recipe with every tracker, killed between rounds and resumed, then each
tracker's own store read back: every round's metrics once per step, in one tracker run, with the
round's pairs table."""

from __future__ import annotations

import json
import sqlite3
import struct
from pathlib import Path

import pytest
import yaml

from online_dpo.analysis import trackers as tracking
from online_dpo.config.recipe import RecipeError, recipe_from_dict
from online_dpo.storage.artifacts import RunDir, read_json, write_json
from tests.conftest import REPO, cli, tiny_recipe_dict

TRACKERS = ["tensorboard", "wandb", "trackio", "mlflow"]
# The trackers' own switches: unset, so the run's defaults (offline, stores in the run dir) apply.
TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "TRACKIO_DIR",
               "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")


# ---------------------------------------------------------------------------- the recipe key


def test_report_to_is_validated(tmp_path):
    base = tiny_recipe_dict("m", tmp_path / "p.jsonl", tmp_path)
    assert recipe_from_dict(base).report_to == []
    assert recipe_from_dict({**base, "report_to": TRACKERS}).report_to == TRACKERS
    with pytest.raises(RecipeError, match=r"report_to\.1: 'neptune' is not one of"):
        recipe_from_dict({**base, "report_to": ["wandb", "neptune"]})
    with pytest.raises(RecipeError, match="report_to: wandb is named twice"):
        recipe_from_dict({**base, "report_to": ["wandb", "wandb"]})


def test_a_tracker_that_is_not_installed_is_refused_with_its_pip_command(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    base = tiny_recipe_dict("m", tmp_path / "p.jsonl", tmp_path, report_to=["tensorboard", "mlflow"])
    with pytest.raises(RecipeError, match=r"report_to: mlflow needs the mlflow package, which is not "
                                          r"installed: pip install 'mlflow-skinny==3\.17\.2'"):
        recipe_from_dict(base)


def test_report_to_may_change_when_resuming(tmp_path):
    from online_dpo.pipeline.run import check_resolved_recipe

    base = tiny_recipe_dict("m", tmp_path / "p.jsonl", tmp_path)
    check_resolved_recipe(recipe_from_dict(base), tmp_path / "run")
    check_resolved_recipe(recipe_from_dict({**base, "report_to": ["tensorboard"]}), tmp_path / "run")
    with pytest.raises(RecipeError, match=r"changed: seed\)"):
        check_resolved_recipe(recipe_from_dict({**base, "report_to": ["mlflow"], "seed": 1}), tmp_path / "run")


def test_the_pip_commands_are_the_pinned_requirements():
    lines = (REPO / "requirements" / "trackers.txt").read_text().splitlines()
    pins = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert {requirement for _, requirement in tracking.PACKAGES.values()} == pins


def test_rounds_are_logged_once_and_a_missed_round_is_caught_up(tmp_path):
    """Round 1's log was missed (a kill after its metrics.json): logging round 2 logs both, in
    order, and logging again adds nothing."""
    recipe = recipe_from_dict(tiny_recipe_dict("m", tmp_path / "p.jsonl", tmp_path, report_to=["tensorboard"]))
    run_dir = RunDir(tmp_path / "run", 2)
    for k in (1, 2):
        write_json(run_dir.round(k) / "metrics.json", {"round": k, "loss": 1.0 / k, "reference_logps_from": "forward",
                                                        "phase_seconds": {"train": 0.5 * k}, "kl_to_pi0": None})
    t = tracking.Tracking(recipe, run_dir)
    t.log_round(2)
    t.log_round(2)
    t.close()
    assert read_json(run_dir.path / "trackers" / "state.json") == {"tensorboard": {"logged": 2}}
    events = tensorboard_events(run_dir.path)
    assert events["loss"] == [(1, 1.0), (2, 0.5)]
    assert events["phase_seconds/train"] == [(1, 0.5), (2, 1.0)]
    assert "kl_to_pi0" not in events and "reference_logps_from" not in events  # numbers only


# ---------------------------------------------------------------------------- a real run, killed and resumed


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tracked")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n"
                               for t in ["the moon", "coffee", "chess", "bread", "rivers", "trains", "snow", "tea"]))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts, tmp / "runs", report_to=TRACKERS)))
    with pytest.MonkeyPatch.context() as mp:
        for var in TRACKER_ENV:
            mp.delenv(var, raising=False)
        killed = cli("run", str(recipe), kill_at="round_2/sample")
        assert killed.returncode == -9, killed.stderr[-3000:]
        run = tmp / "runs" / "tiny"
        state = read_json(run / "trackers" / "state.json")
        assert {name: s["logged"] for name, s in state.items()} == dict.fromkeys(TRACKERS, 1)
        resumed = cli("run", str(recipe))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert {name: s["logged"] for name, s in read_json(run / "trackers" / "state.json").items()} == \
        dict.fromkeys(TRACKERS, 2)
    assert read_json(run / "trackers" / "state.json")["wandb"]["id"] == state["wandb"]["id"]
    assert read_json(run / "trackers" / "state.json")["mlflow"]["id"] == state["mlflow"]["id"]
    return run


def metrics(run: Path, k: int) -> dict:
    return read_json(run / f"round_{k}" / "metrics.json")


def tensorboard_events(run: Path) -> dict[str, list]:
    """tag -> [(step, value)] over every event file, in write order (a repeat shows up twice)."""
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    out: dict[str, list] = {}
    for path in sorted((run / "trackers" / "tensorboard").glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
                elif v.metadata.plugin_data.plugin_name == "text":
                    out.setdefault(v.tag, []).append((event.step, v.tensor.string_val[0].decode()))
    return out


def test_tensorboard_has_every_round_once(tracked_run):
    events = tensorboard_events(tracked_run)
    assert len(list((tracked_run / "trackers" / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process
    for tag in ("loss", "accuracy", "judge_score", "phase_seconds/train", "phase_seconds/sample", "round_seconds"):
        assert [step for step, _ in events[tag]] == [1, 2], tag
    for k in (1, 2):
        assert dict(events["loss"])[k] == pytest.approx(metrics(tracked_run, k)["loss"], rel=1e-6)
        assert dict(events["phase_seconds/train"])[k] == pytest.approx(
            metrics(tracked_run, k)["phase_seconds"]["train"], rel=1e-6)
    assert [step for step, _ in events["pairs/text_summary"]] == [1, 2]
    header = dict(events["pairs/text_summary"])[1].splitlines()[0]
    assert header == "| prompt | chosen | rejected | chosen_score | rejected_score | reason | replay |"


def wandb_records(path: Path):
    """A .wandb transaction log (LevelDB log format: 32 KiB blocks of CRC'd chunks), read into
    W&B's own Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding to the end of the block
            pos += left - 7 - length
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # full, or the last chunk of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_is_offline_in_the_run_dir_with_every_round_once_in_one_run(tracked_run):
    run_id = read_json(tracked_run / "trackers" / "state.json")["wandb"]["id"]
    folders = sorted((tracked_run / "trackers" / "wandb").glob("offline-run-*"))
    assert folders and all(f.name.endswith(f"-{run_id}") for f in folders)  # offline: no network, one id
    history, ids = [], set()
    for folder in folders:
        for record in wandb_records(folder / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    assert ids == {run_id}
    assert [row["_step"] for row in history] == [1, 2]
    for row in history:
        k = row["_step"]
        assert row["loss"] == pytest.approx(metrics(tracked_run, k)["loss"])
        assert row["phase_seconds/sample"] == pytest.approx(metrics(tracked_run, k)["phase_seconds"]["sample"])
        assert row["pairs/_type"] == "table-file" and row["pairs/nrows"] == metrics(tracked_run, k)["pairs_kept"]
    tables = sorted((tracked_run / "trackers" / "wandb").glob("offline-run-*/files/media/table/pairs_*.table.json"))
    assert len(tables) == 2
    assert json.loads(tables[0].read_text())["columns"][:3] == ["prompt", "chosen", "rejected"]


def test_trackio_store_in_the_run_dir_has_every_round_once(tracked_run):
    db = tracked_run / "trackers" / "trackio" / f"{tracking.PROJECT}.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("select run_id, run_name, step, metrics from metrics order by id").fetchall()
    assert {(run_id, name) for run_id, name, _, _ in rows} == {(rows[0][0], "tiny")}  # one run, resumed
    assert [step for _, _, step, _ in rows] == [1, 2]
    for _, _, k, blob in rows:
        logged = json.loads(blob)
        assert logged["loss"] == pytest.approx(metrics(tracked_run, k)["loss"])
        assert logged["phase_seconds/train"] == pytest.approx(metrics(tracked_run, k)["phase_seconds"]["train"])
        assert logged["pairs"]["_type"] == "trackio.table"
        assert len(logged["pairs"]["_value"]) == metrics(tracked_run, k)["pairs_kept"]
        assert {"prompt", "chosen", "rejected", "chosen_score", "reason"} <= logged["pairs"]["_value"][0].keys()


def test_mlflow_file_store_in_the_run_dir_has_every_round_once_in_one_run(tracked_run):
    run_id = read_json(tracked_run / "trackers" / "state.json")["mlflow"]["id"]
    runs = [p for p in (tracked_run / "trackers" / "mlflow").glob("*/*") if (p / "meta.yaml").exists()]
    assert [p.name for p in runs] == [run_id]
    metric_dir = runs[0] / "metrics"

    def steps(name):  # the file store's lines: "<timestamp> <value> <step>"
        lines = (metric_dir / name).read_text().split("\n")
        return [(int(line.split()[2]), float(line.split()[1])) for line in lines if line]

    for name in ("loss", "accuracy", "phase_seconds/train", "round_seconds"):
        assert [step for step, _ in steps(name)] == [1, 2], name
    assert dict(steps("loss")) == pytest.approx({k: metrics(tracked_run, k)["loss"] for k in (1, 2)})
    assert (runs[0] / "params" / "train.learning_rate").read_text() == "0.001"
    for k in (1, 2):
        table = json.loads((runs[0] / "artifacts" / "pairs" / f"round_{k}.json").read_text())
        assert len(table) == metrics(tracked_run, k)["pairs_kept"] and "rejected_score" in table[0]
