"""Experiment tracking: each round's metrics and sampled pairs, sent to the trackers a recipe names
in `report_to` (TensorBoard, W&B, trackio, MLflow) through accelerate's tracker classes.

Everything stays under runs/<name>/trackers/ and nothing goes over the network unless the user
asks in the tracker's own environment variable: W&B runs offline unless WANDB_MODE is set, MLflow
writes a file store here unless MLFLOW_TRACKING_URI is set, trackio writes its SQLite store here
unless TRACKIO_DIR is set, and MLflow's telemetry is off unless MLFLOW_DISABLE_TELEMETRY is set.

Resume. trackers/state.json keeps each tracker's run id and the last round it logged. When a round's
metrics.json is written, that round is logged, with any earlier finished round a tracker has not
logged yet (a run killed between the two), and it counts as logged only once it is on disk:
TensorBoard and MLflow write synchronously and stay open for the run; W&B and trackio buffer in a
background process or thread that a kill loses, so each is opened for the round and finished (their
one public flush) before the round counts. A resumed run continues the same tracker runs (W&B's id
with resume="allow", MLflow's run_id, trackio's run name, TensorBoard's log folder) and logs each
round once. Only process 0 tracks; the others get `NoTracking`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import uuid
from pathlib import Path

from online_dpo.config.errors import RecipeError
from online_dpo.storage.artifacts import RunDir, read_json, read_jsonl, write_json

PROJECT = "online-dpo"
# Import name and pip requirement per tracker; the pins are requirements/trackers.txt's (a test
# keeps them equal). mlflow-skinny: MLflow's tracking client and file store, without its server.
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "wandb": ("wandb", "wandb==0.31.0"),
            "trackio": ("trackio", "trackio==0.43.0"), "mlflow": ("mlflow", "mlflow-skinny==3.17.2")}
# Their writes are buffered in a background process (W&B) or thread (trackio): one session a round.
PER_ROUND = ("wandb", "trackio")


def check_trackers(names) -> None:
    """At recipe load: each tracker named once, and its package installed (found, not imported)."""
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RecipeError(f"report_to: {name} is named twice")
        module, requirement = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise RecipeError(f"report_to: {name} needs the {module} package, which is not installed: "
                              f"pip install '{requirement}' (every tracker: pip install -r "
                              "requirements/trackers.txt, or the online-dpo[trackers] extra)")


def build_tracking(recipe, run_dir: RunDir, writer: bool):
    """Process 0 tracks (trackers open lazily, at the first round logged); the others do nothing."""
    return Tracking(recipe, run_dir) if writer and recipe.report_to else NoTracking()


class NoTracking:
    def log_round(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


class Tracking:
    def __init__(self, recipe, run_dir: RunDir):
        self.recipe, self.run_dir = recipe, run_dir
        self.dir = run_dir.path / "trackers"
        self.state_path = self.dir / "state.json"
        self.state: dict = read_json(self.state_path) if self.state_path.exists() else {}
        self.open: dict = {}  # the trackers that stay open for the run (TensorBoard, MLflow)

    def log_round(self, k: int) -> None:
        """Round k, after any earlier finished round that a tracker has not logged yet."""
        for name in self.recipe.report_to:
            entry = self.state.setdefault(name, {"logged": 0})
            rounds = [j for j in range(entry["logged"] + 1, k + 1) if self.run_dir.done(j, "metrics")]
            if not rounds:
                continue
            tracker = self.open.get(name) or self._start(name, entry)
            try:
                for j in rounds:
                    LOGGERS[name](tracker, j, round_scalars(self.run_dir.round(j)), pairs_table(self.run_dir.round(j)))
                    if name not in PER_ROUND:  # on disk now: TensorBoard flushes, MLflow's store is synchronous
                        self._mark(name, j)
            finally:
                if name in PER_ROUND:
                    tracker.finish()
            self._mark(name, rounds[-1])

    def close(self) -> None:
        for name in list(self.open):
            self.open.pop(name).finish()

    def _mark(self, name: str, k: int) -> None:
        self.state[name]["logged"] = k
        write_json(self.state_path, self.state)

    def _start(self, name: str, entry: dict):
        config = self.recipe.model_dump()
        if name == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            tracker = TensorBoardTracker("tensorboard", str(self.dir))  # logs to trackers/tensorboard/
        elif name == "wandb":
            tracker = self._wandb(entry, config)
        elif name == "trackio":
            os.environ.setdefault("TRACKIO_DIR", str(self.dir / "trackio"))  # read when trackio imports
            from accelerate.tracking import TrackioTracker

            entry.setdefault("id", self.recipe.name)  # trackio resumes a run by its name
            write_json(self.state_path, self.state)
            tracker = TrackioTracker(PROJECT, name=entry["id"], resume="allow", config=config,
                                     auto_log_cpu=False, auto_log_gpu=False)
        else:
            tracker = self._mlflow(entry)
        tracker.start()
        if name == "mlflow" and "id" not in entry:  # a new run: its id, then the recipe as params
            entry["id"] = tracker.active_run.info.run_id
            write_json(self.state_path, self.state)
            tracker.store_init_configuration(flatten(config, "."))
        if name not in PER_ROUND:
            self.open[name] = tracker
        return tracker

    def _wandb(self, entry: dict, config: dict):
        os.environ.setdefault("WANDB_MODE", "offline")
        # W&B's debug logs and the staging area of the pairs tables (an offline sync reads them).
        os.environ.setdefault("WANDB_CACHE_DIR", str(self.dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(self.dir / "wandb" / "data"))
        import wandb
        from accelerate.tracking import WandBTracker

        if "id" not in entry:  # kept before the run starts, so a kill cannot leave a second run
            entry["id"] = uuid.uuid4().hex[:8]
            write_json(self.state_path, self.state)
        return WandBTracker(PROJECT, name=self.recipe.name, id=entry["id"], resume="allow", dir=str(self.dir),
                            config=config, settings=wandb.Settings(x_disable_stats=True, console="off",
                                                                   quiet=True))

    def _mlflow(self, entry: dict):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # The file store is in maintenance mode in MLflow 3 and refused unless allowed; a database
        # store needs the full mlflow package (SQLAlchemy, Alembic, its server).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow
        from accelerate.tracking import MLflowTracker

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (self.dir / "mlflow").resolve().as_uri())
        return MLflowTracker(experiment_name=PROJECT, run_id=entry.get("id"), run_name=self.recipe.name)


# ---------------------------------------------------------------------------- what a round logs


def flatten(values: dict, sep: str = "/", prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def round_scalars(round_dir: Path) -> dict:
    """Every number in metrics.json, nested ones as e.g. phase_seconds/train (bools as 0/1)."""
    metrics = flatten(read_json(round_dir / "metrics.json"))
    return {key: int(v) if isinstance(v, bool) else v for key, v in metrics.items() if isinstance(v, int | float)}


def _text(messages) -> str:
    """A prompt or completion as text: a string, or the last chat message's content."""
    return messages if isinstance(messages, str) else messages[-1]["content"]


def pairs_table(round_dir: Path) -> tuple[list[str], list[list]] | None:
    """The round's training pairs (KTO: examples) with their judge scores and reason, or None."""
    if not (round_dir / "pairs").exists():
        return None
    import datasets

    rows = datasets.load_from_disk(str(round_dir / "pairs")).to_list()
    if rows and "completion" in rows[0]:
        return ["prompt", "completion", "label", "score"], [
            [_text(r["prompt"]), _text(r["completion"]), bool(r["label"]), r["score"]] for r in rows]
    judged = {}  # prompt index -> its judgment, for the round's own (not replayed) pairs
    if (round_dir / "judgments.jsonl").exists():
        samples = read_jsonl(round_dir / "samples.jsonl")
        judged = {s["prompt_index"]: j for s, j in zip(samples, read_jsonl(round_dir / "judgments.jsonl"),
                                                         strict=True)}
    table = []
    for r in rows:
        j = None if r.get("replay") else judged.get(r.get("prompt_index"))
        scores = (j or {}).get("scores")
        chosen, rejected = ([scores[j["chosen"]], scores[j["rejected"]]] if scores and j.get("chosen") is not None
                            else [None, None])
        table.append([_text(r["prompt"]), _text(r["chosen"]), _text(r["rejected"]), chosen, rejected,
                      r.get("reason"), bool(r.get("replay"))])
    return ["prompt", "chosen", "rejected", "chosen_score", "rejected_score", "reason", "replay"], table


def markdown(table) -> str:
    columns, rows = table

    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _tensorboard(tracker, k: int, scalars: dict, table) -> None:
    tracker.log({**scalars, **({"pairs": markdown(table)} if table else {})}, step=k)  # text: add_text


def _wandb(tracker, k: int, scalars: dict, table) -> None:
    tracker.log(scalars, step=k)
    if table:
        tracker.log_table("pairs", columns=table[0], data=table[1], step=k)


def _trackio(tracker, k: int, scalars: dict, table) -> None:
    import trackio

    tracker.log({**scalars, **({"pairs": trackio.Table(columns=table[0], data=table[1])} if table else {})},
                step=k)


def _mlflow(tracker, k: int, scalars: dict, table) -> None:
    tracker.log(scalars, step=k)
    if table:  # no tables in MLflow's tracker: the rows as a JSON artifact, pairs/round_<k>.json
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"round_{k}.json"
            path.write_text(json.dumps([dict(zip(table[0], row)) for row in table[1]], indent=1))
            tracker.log_artifact(str(path), artifact_path="pairs")


LOGGERS = {"tensorboard": _tensorboard, "wandb": _wandb, "trackio": _trackio, "mlflow": _mlflow}
