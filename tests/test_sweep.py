"""Seeds and sweeps: grid expansion and naming, validation before anything runs, a sweep killed
mid-cell and resumed without redoing finished cells, arms grouped by arm_of, `run --seeds`."""

import json
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from online_dpo.analysis.sweep import arm_of, parse_seeds, plan_seeds, plan_sweep
from online_dpo.config.recipe import RecipeError, recipe_from_dict, recipe_to_dict
from tests.conftest import cli, tiny_recipe_dict

REPO = Path(__file__).resolve().parents[1]


def write_sweep(tmp_path, base_dict, **sweep) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_dict))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "sw", "base": "base.yaml", **sweep}, sort_keys=False))
    return path


def base(tmp_path, **overrides) -> dict:
    # Grid expansion never loads a model: the paths need only exist.
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    return tiny_recipe_dict(tmp_path, tmp_path / "p.jsonl", tmp_path / "runs", **overrides)


# ---------------------------------------------------------------------------- planning


def test_grid_expands_seed_major_with_names_from_grid_values(tmp_path):
    path = write_sweep(tmp_path, base(tmp_path), overrides={"rounds": 1},
                       grid={"loss.beta": [0.1, 0.3], "train.learning_rate": ["1e-5", 2.0e-4],
                             "loss.length_normalize": [True]}, seeds=[0, 1])
    plan = plan_sweep(path)
    assert len(plan.cells) == 8 and plan.dir == tmp_path / "runs" / "sw"
    first = plan.cells[0]
    assert first.name == "sw/loss.beta=0.1,train.learning_rate=1e-5,loss.length_normalize=true__seed0"
    assert first.arm == {"loss.beta": 0.1, "train.learning_rate": "1e-5", "loss.length_normalize": True}
    assert first.run_dir == tmp_path / "runs" / first.name
    assert plan.cells[1].arm_label == "loss.beta=0.1,train.learning_rate=0.0002,loss.length_normalize=true"
    assert [c.seed for c in plan.cells] == [0] * 4 + [1] * 4  # every arm's seed 0 first
    assert [c.arm_label for c in plan.cells[:4]] == [c.arm_label for c in plan.cells[4:]]
    assert len({c.arm_key for c in plan.cells}) == 4
    assert all(c.arm_key == d.arm_key for c, d in zip(plan.cells[:4], plan.cells[4:]))
    # The overrides a cell's process gets read back as the grid's values.
    assert first.overrides == ("rounds=1", "loss.beta=0.1", "train.learning_rate=1e-5",
                               "loss.length_normalize=true", f"name={first.name}", "seed=0")
    for cell in plan.cells:
        assert {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in cell.overrides[1:4]} == cell.arm
    assert first.rounds == 1


def test_unsafe_values_and_an_empty_grid(tmp_path):
    path = write_sweep(tmp_path, base(tmp_path), grid={"judge.kwargs": [{"max_words": 5}, {"max_words": 9}]},
                       seeds=[3])
    names = [c.name for c in plan_sweep(path).cells]
    assert names == ["sw/judge.kwargs=max_words-5__seed3", "sw/judge.kwargs=max_words-9__seed3"]
    plan = plan_seeds(tmp_path / "base.yaml", ["name=many", "rounds=1"], [0, 1])
    assert [c.name for c in plan.cells] == ["many/seed0", "many/seed1"]
    assert {c.arm_label for c in plan.cells} == {"many"} and plan.cells[0].overrides == (
        "rounds=1", "name=many/seed0", "seed=0")


@pytest.mark.parametrize("sweep, message", [
    ({"grd": {}}, "unknown key grd (known: base, grid, name, overrides, seeds)"),
    ({"grid": {"seed": [1, 2]}}, "grid.seed: cannot be swept (use seeds:)"),
    ({"grid": {"loss.beta": 0.1}}, "grid.loss.beta: Input should be a valid list"),
    ({"grid": {"loss.beta": []}}, "grid.loss.beta: needs at least one value"),
    ({"grid": {"loss.beta": [0.1, 0.1]}}, "grid.loss.beta: repeated value"),
    ({"seeds": [1, 1]}, "seeds: repeated seed"),
    ({"seeds": ["a"]}, "seeds.0: expected an integer"),
    ({"overrides": ["seed=3"]}, "overrides: seed cannot be overridden"),
    ({"name": "../up"}, "is not a safe folder name"),
    ({"base": "nope.yaml"}, "base recipe not found"),
    ({"grid": {"loss.betta": [0.1]}}, "cell sw/loss.betta=0.1__seed0: unknown key loss.betta"),
    ({"grid": {"loss.beta": [0.1, -1]}}, "cell sw/loss.beta=-1__seed0: loss.beta: must be > 0, got -1"),
])
def test_bad_sweeps_name_the_key(tmp_path, sweep, message):
    path = write_sweep(tmp_path, base(tmp_path), **sweep)
    with pytest.raises(RecipeError) as e:
        plan_sweep(path)
    assert message in str(e.value)


def test_shipped_sweeps_are_valid():
    files = sorted((REPO / "recipes" / "sweeps").glob("*.yaml"))
    assert files
    for path in files:
        plan = plan_sweep(path)
        assert len({c.arm_key for c in plan.cells}) == len(plan.cells) // len(plan.sweep.seeds) > 1


# ---------------------------------------------------------------------------- real sweeps


def mtimes(run_dir: Path) -> dict:
    return {p.relative_to(run_dir).as_posix(): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


def test_sweep_killed_mid_cell_resumes_without_redoing_finished_cells(tiny_model_dir, prompts_file, tmp_path):
    recipe = tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1)
    recipe["eval"] = {"win_rate_vs_pi0": False}
    path = write_sweep(tmp_path, recipe, grid={"loss.beta": [0.1, 0.5]}, seeds=[0, 1])
    cells = [c.name for c in plan_sweep(path).cells]
    assert cells == ["sw/loss.beta=0.1__seed0", "sw/loss.beta=0.5__seed0",
                     "sw/loss.beta=0.1__seed1", "sw/loss.beta=0.5__seed1"]
    runs, manifest = tmp_path / "runs", tmp_path / "runs" / "sw" / "sweep.json"

    killed = cli("sweep", str(path), kill_at="round_1/pairs", env={"ONLINE_DPO_KILL_CELL": cells[2]})
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert f"cell {cells[2]} failed (killed by SIGKILL)" in killed.stderr
    listed = json.loads(manifest.read_text())["cells"]
    assert [(c["status"], c["exit_code"]) for c in listed] == [
        ("finished", 0), ("finished", 0), ("failed", -signal.SIGKILL), ("pending", None)]
    assert listed[0]["arm"] == {"loss.beta": 0.1} and listed[0]["seed"] == 0
    assert listed[0]["run_dir"] == str(runs / cells[0])
    third = runs / cells[2] / "round_1"
    assert (third / "pairs.json").exists() and not (third / "train.json").exists()
    before = {name: mtimes(runs / name) for name in cells[:2]}
    samples_mtime = (third / "samples.jsonl").stat().st_mtime_ns

    resumed = cli("sweep", str(path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"cell 1/4 {cells[0]}: finished earlier, skipped" in resumed.stdout
    assert "round 1:" in resumed.stdout  # a cell's own output streams through
    listed = json.loads(manifest.read_text())["cells"]
    assert [c["status"] for c in listed] == ["finished"] * 4
    assert all((runs / name / "metrics.jsonl").exists() for name in cells)
    assert {name: mtimes(runs / name) for name in cells[:2]} == before  # not redone, not touched
    assert (third / "samples.jsonl").stat().st_mtime_ns == samples_mtime  # the killed cell resumed

    # Seeds differ (different prompts and samples); arms group by arm_of, swept or not.
    def texts(name):
        return [s["text"] for rec in map(json.loads, (runs / name / "round_1" / "samples.jsonl").open())
                for s in rec["samples"]]
    assert texts(cells[0]) != texts(cells[2])
    arms = [arm_of(runs / name) for name in cells]
    assert arms[0] == arms[2] and arms[1] == arms[3] and arms[0][0] != arms[1][0]
    assert [a[1] for a in arms] == ["loss.beta=0.1", "loss.beta=0.5"] * 2
    assert [a[0] for a in arms] == [c["arm_key"] for c in listed]
    loose = tmp_path / "elsewhere" / "my-run_seed7"  # not in a sweep: grouped by its recipe alone
    shutil.copytree(runs / cells[1], loose)
    assert arm_of(loose) == (arms[1][0], "my-run")


def test_bad_grid_value_is_refused_before_anything_runs(tmp_path):
    path = write_sweep(tmp_path, base(tmp_path), grid={"loss.beta": [0.1, 0]})
    out = cli("sweep", str(path))
    assert out.returncode == 2
    assert "cell sw/loss.beta=0__seed0: loss.beta: must be > 0, got 0" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_run_with_seeds_makes_one_run_per_seed(tiny_model_dir, prompts_file, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", rounds=1)))
    out = cli("run", str(recipe), "--seeds", "0,1", "name=two")
    assert out.returncode == 0, out.stderr[-3000:]
    listed = json.loads((tmp_path / "runs" / "two" / "sweep.json").read_text())
    assert [(c["name"], c["seed"], c["status"]) for c in listed["cells"]] == [
        ("two/seed0", 0, "finished"), ("two/seed1", 1, "finished")]
    assert yaml.safe_load((tmp_path / "runs" / "two" / "seed1" / "recipe.yaml").read_text())["seed"] == 1
    assert arm_of(tmp_path / "runs" / "two" / "seed0") == arm_of(tmp_path / "runs" / "two" / "seed1")


def test_parse_seeds():
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(RecipeError, match="--seeds: expected comma-separated integers"):
        parse_seeds("0,x")


def test_a_run_written_before_a_key_existed_stays_in_its_arm(tmp_path):
    """A recipe.yaml lacking a key added later (with its default) is the same recipe."""
    full = recipe_to_dict(recipe_from_dict({"name": "a/seed0", "rounds": 2, "data": {"prompts": "p.jsonl"},
                                            "judge": {"target": "judges.rules:ConciseAnswerJudge"}}))
    older = {**full, "name": "a/seed1", "seed": 1,
             "generation": {k: v for k, v in full["generation"].items() if k not in ("server", "sleep")}}
    other = {**full, "name": "a/seed2", "seed": 2, "generation": {**full["generation"], "temperature": 0.5}}
    for name, recipe in (("seed0", full), ("seed1", older), ("seed2", other)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert arm_of(tmp_path / "seed0") == arm_of(tmp_path / "seed1") != arm_of(tmp_path / "seed2")
