"""Data-parallel training with 2 real processes on CPU (torchrun, gloo): disjoint shards, averaged
gradients, and the same result as one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO


def launch(tiny_model_dir, out, procs, micro_pairs, accum):
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(REPO / "tests" / "ddp_worker.py"), str(tiny_model_dir), str(out), str(micro_pairs), str(accum)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def test_two_processes_match_one_on_the_same_global_batch(tiny_model_dir, tmp_path):
    # 16 pairs, 8 per optimizer step: 1 process x 4 pairs x 2 accumulation = 2 processes x 4 pairs.
    one = launch(tiny_model_dir, tmp_path / "one", procs=1, micro_pairs=4, accum=2)
    two = launch(tiny_model_dir, tmp_path / "two", procs=2, micro_pairs=4, accum=1)
    assert one["world"] == 1 and two["world"] == 2
    assert one["optimizer_steps"] == two["optimizer_steps"] == 2

    seen = [json.loads((tmp_path / "two" / f"seen_{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(16))

    w = [load_file(tmp_path / "two" / f"weights_{r}.safetensors") for r in (0, 1)]
    ref = load_file(tmp_path / "one" / "weights_0.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(initial[k], ref[k]) for k in ref)  # training moved the weights
    for k in ref:
        assert torch.equal(w[0][k], w[1][k]), k  # averaged gradients: both ranks hold the same model
        torch.testing.assert_close(w[0][k], ref[k], atol=2e-6, rtol=1e-4)
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-4)


def test_a_whole_run_with_two_processes(tiny_model_dir, prompts_file, tmp_path):
    """`torchrun -m online_dpo.cli run`: process 0 samples, judges and writes; both train."""
    import yaml

    from tests.conftest import tiny_recipe_dict

    recipe = tmp_path / "tiny.yaml"
    # One optimizer step of 4 pairs per round either way: 1 x 4 pairs, or 2 processes x 2 pairs.
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(
        tiny_model_dir, prompts_file, tmp_path / "runs", **{"train.micro_batch_pairs": 4})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rows = {}
    for name, procs, micro in (("one", 1, 4), ("two", 2, 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "online_dpo.cli", "run", str(recipe), f"name={name}", f"train.micro_batch_pairs={micro}"]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.count("[online-dpo] round 1:") == 1  # printed by process 0 alone
        rows[name] = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows["two"]) == 2 and all(r["optimizer_steps"] == 1 for r in rows["two"])
    a, b = rows["one"][0], rows["two"][0]
    assert a["pairs_kept"] == b["pairs_kept"] and a["judge_score"] == b["judge_score"]  # same samples
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    ckpt = [load_file(tmp_path / "runs" / n / "round_1" / "checkpoint" / "model.safetensors") for n in ("one", "two")]
    for k in ckpt[0]:  # lr 1e-3 moves weights by ~1e-3; Adam magnifies float noise where grads ~ 0
        torch.testing.assert_close(ckpt[0][k], ckpt[1][k], atol=2e-5, rtol=1e-4)


def test_shipped_accelerate_config_is_valid():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    config = ClusterConfig.from_yaml_file(str(REPO / "recipes" / "accelerate" / "ddp.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes == 2
