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
from tests.test_config import minimal


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


def _run_cli(args, env, launcher):
    done = subprocess.run(launcher + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _sharded_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path, launcher_script, config,
                                     loss_atol=1e-5, grad_rtol=1e-4, probe_atol=1e-3, weight_atol=2e-4,
                                     **overrides):
    """2 processes through `accelerate launch` with a shipped config, round 1 alone then extended
    to 2 rounds (the resume restores and re-syncs the policy), against one unsharded process on
    the same batches: same samples, losses and gradient norms, and close weights."""
    import yaml

    from tests.conftest import tiny_recipe_dict

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_model_dir, prompts_file, tmp_path / "runs", **overrides)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    one = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "online_dpo.cli"]
    two = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / config), "--num_processes", "2",
           "--main_process_port", "0", str(REPO / "tests" / launcher_script)]
    _run_cli(["run", str(recipe), "name=one", "train.micro_batch_pairs=4"], env, one)
    _run_cli(["run", str(recipe), "name=two", "rounds=1"], env, two)
    done = _run_cli(["run", str(recipe), "name=two"], env, two)
    assert "resuming: policy from round_1/checkpoint" in done.stdout

    rows = {n: [json.loads(x) for x in (tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", "two")}
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert a["pairs_kept"] == b["pairs_kept"] and a["judge_score"] == b["judge_score"]  # same samples
        assert a["loss"] == pytest.approx(b["loss"], abs=loss_atol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=grad_rtol)
    run = tmp_path / "runs" / "two"
    assert json.loads((run / "round_2" / "sync.json").read_text())["probe_max_abs_diff"] < probe_atol
    if "reference.schedule" not in overrides:  # the tiny recipe swaps every round
        assert json.loads((run / "round_2" / "reference.json").read_text())["source_round"] == 2
    for k in (1, 2):
        ckpt = [load_file(tmp_path / "runs" / n / f"round_{k}" / "checkpoint" / "model.safetensors")
                for n in ("one", "two")]
        assert ckpt[0].keys() == ckpt[1].keys()
        for key in ckpt[0] if weight_atol is not None else ():  # 2 rounds at lr 1e-3 move weights by ~2e-3; Adam magnifies the
            # reduce-scatter's different summation order where a gradient is ~0 (one weight in
            # 8,192 moved 1.4e-4 apart under FSDP2), so a bound of a tenth of the movement
            torch.testing.assert_close(ckpt[0][key], ckpt[1][key], atol=weight_atol, rtol=1e-4)
    return run


def test_a_sharded_fsdp2_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path):
    """FSDP2: gathers before every sync, reference swap and checkpoint, collectively."""
    run = _sharded_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path, "fsdp_cpu.py", "fsdp.yaml")
    assert json.loads((run / "round_2" / "train.json").read_text())["distributed"] == "FSDP2"


LORA = {"train.lora": {"rank": 4, "alpha": 8}, "reference.schedule": "fixed", "train.learning_rate": 5e-3}


def test_lora_sharded_by_fsdp2_matches_one_process(tiny_model_dir, prompts_file, tmp_path):
    """LoRA under FSDP2: merged layers gathered one at a time for every sync and checkpoint, the
    adapter gathered for its checkpoint and restored on resume, and the reference log-probs and
    the eval step's KL to pi_0 (the sharded base, adapter off) scored in shares by collective
    forwards."""
    run = _sharded_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path, "fsdp_cpu.py", "fsdp.yaml", **LORA)
    train = json.loads((run / "round_2" / "train.json").read_text())
    assert train["distributed"] == "FSDP2"
    # Round 2's reference (pi_0, not the sampler) is scored in shares, each process its own.
    per_process = train["reference_scored_per_process"]
    assert len(per_process) == 2 and min(per_process) > 0 and sum(per_process) == 2 * train["train_pairs"]
    adapter = [load_file(tmp_path / "runs" / n / "round_2" / "checkpoint" / "adapter" / "adapter_model.safetensors")
               for n in ("one", "two")]
    assert adapter[0].keys() == adapter[1].keys() and adapter[0]
    for key in adapter[0]:  # whole (gathered) tensors, as one process saves them
        torch.testing.assert_close(adapter[0][key], adapter[1][key], atol=2e-5, rtol=1e-4)


def test_lora_on_a_bf16_base_sharded_by_fsdp2(tiny_model_dir, prompts_file, tmp_path):
    """The CUDA layout on CPU: the frozen base in bf16, the adapter and its Adam state in float32,
    so FSDP2 all-gathers mixed dtypes. A bf16 forward rounds differently in other batch shapes
    (1 process x 4 pairs against 2 x 2): measured 5e-5 apart in loss and 7e-4 relative in gradient
    norm, and Adam's first steps turn that noise into sign flips where a gradient is ~0, so the
    weights are not compared. The float32 sampler scores the probe ~1.5e-3 from the bf16 trainer."""
    lora = {**LORA, "train.lora": {**LORA["train.lora"], "base_dtype": "bfloat16"}}
    run = _sharded_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path, "fsdp_cpu.py", "fsdp.yaml",
                                           loss_atol=2e-4, grad_rtol=3e-3, probe_atol=1e-2, weight_atol=None, **lora)
    adapter = load_file(run / "round_2" / "checkpoint" / "adapter" / "adapter_model.safetensors")
    assert adapter and {t.dtype for t in adapter.values()} == {torch.float32}
    merged = load_file(run / "round_2" / "checkpoint" / "model.safetensors")
    # Adapted layers are base + float32 delta (float32); the rest is the bf16 base as it was.
    assert merged["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert merged["model.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_zero_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path, stage):
    """DeepSpeed ZeRO-2 (optimizer state and gradients partitioned) and ZeRO-3 (weights too,
    gathered collectively before every sync, reference swap and checkpoint)."""
    run = _sharded_run_matches_one_process(tiny_model_dir, prompts_file, tmp_path, "deepspeed_cpu.py",
                                           f"deepspeed_zero{stage}.yaml")
    train = json.loads((run / "round_2" / "train.json").read_text())
    assert train["distributed"] == f"DeepSpeed ZeRO-{stage}" and train["processes"] == 2


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_are_valid(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "recipes" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_processes == 2
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if name.startswith("deepspeed"):  # the run refuses zero.Init (see distributed.load_models_whole)
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        assert config.deepspeed_config["zero3_init_flag"] is False
        assert config.deepspeed_config["offload_optimizer_device"] == "none"  # refused otherwise


def test_the_recipe_drives_deepspeed_batch_settings():
    from types import SimpleNamespace

    from online_dpo.config.recipe import TrainConfig
    from online_dpo.training.distributed import prepare_deepspeed_config

    def accelerator(config):
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))

    config = {"gradient_clipping": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
    prepare_deepspeed_config(accelerator(config), TrainConfig(micro_batch_pairs=3, max_grad_norm=0.5))
    # The trainer marks the accumulation boundary itself: DeepSpeed must not scale the loss.
    assert config == {"gradient_clipping": 0.5, "gradient_accumulation_steps": 1,
                      "train_micro_batch_size_per_gpu": 3}
    with pytest.raises(ValueError, match="gradient_clipping 2.0 but the recipe's train.max_grad_norm is 0.5"):
        prepare_deepspeed_config(accelerator({"gradient_clipping": 2.0}), TrainConfig(max_grad_norm=0.5))


def _accelerator(kind, fsdp_version=2, zero_stage=2, zero3_init=False, fp16=False, num_processes=1,
                 offload="none"):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    # The shape of the config accelerate's DeepSpeedPlugin builds from a config file's keys.
    zero = {"stage": zero_stage, "offload_optimizer": {"device": offload}, "offload_param": {"device": "none"}}
    deepspeed = SimpleNamespace(zero_stage=zero_stage, zero3_init_flag=zero3_init,
                                deepspeed_config={"fp16": {"enabled": fp16}, "zero_optimization": zero})
    return SimpleNamespace(distributed_type=DistributedType[kind], is_main_process=True, num_processes=num_processes,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                                                 deepspeed_plugin=deepspeed))


@pytest.mark.parametrize("kind, settings, overrides, error", [
    ("MULTI_CPU", {}, {}, None),
    ("MULTI_GPU", {}, {"reference": {"schedule": "ema"}}, None),  # DDP: whole weights on every process
    ("MULTI_CPU", {"num_processes": 2}, {"generation": {"backend": "vllm"}}, "set generation.engines: every_process"),
    ("MULTI_CPU", {"num_processes": 2}, {"generation": {"backend": "vllm", "engines": "every_process"}}, None),
    ("MULTI_CPU", {"num_processes": 2}, {"generation": {"backend": "transformers"}}, None),
    ("MULTI_CPU", {"num_processes": 2}, {"generation": {"backend": "transformers"},
                                         "eval": {"judge": {"target": "judges.llm:LLMJudge",
                                                            "kwargs": {"backend": "vllm", "model": "smollm2"}}}},
     "eval.judge.kwargs.backend: vllm"),
    ("FSDP", {}, {}, None),
    ("FSDP", {"fsdp_version": 1}, {}, "fsdp_version: 2"),
    ("FSDP", {}, {"train": {"lora": {"rank": 4}}, "reference": {"schedule": "fixed"}}, None),
    ("FSDP", {}, {"reference": {"schedule": "ema"}}, "ema with FSDP"),
    ("DEEPSPEED", {"zero_stage": 2}, {"reference": {"schedule": "ema"}}, None),
    ("DEEPSPEED", {"zero_stage": 3}, {}, None),
    ("DEEPSPEED", {"zero_stage": 3, "zero3_init": True}, {}, "zero3_init_flag: false"),
    ("DEEPSPEED", {"zero_stage": 3}, {"reference": {"schedule": "ema"}}, "ema with ZeRO-3"),
    ("DEEPSPEED", {}, {"train": {"lora": {"rank": 4}}, "reference": {"schedule": "fixed"}}, "train.lora with DeepSpeed"),
    ("DEEPSPEED", {"fp16": True}, {}, "fp16 is not supported"),
    ("DEEPSPEED", {"zero_stage": 3, "offload": "cpu"}, {}, "offload_optimizer to CPU is not supported"),
    ("XLA", {}, {}, "not supported by the round pipeline"),
])
def test_which_distributed_setups_the_pipeline_accepts(kind, settings, overrides, error):
    from online_dpo.config.compat import check_launch
    from online_dpo.config.recipe import recipe_from_dict

    recipe = recipe_from_dict(minimal(**overrides))
    if error is None:
        check_launch(recipe, _accelerator(kind, **settings))
    else:
        with pytest.raises(RuntimeError, match=error):
            check_launch(recipe, _accelerator(kind, **settings))


def test_an_fsdp_config_on_cpu_warns_that_it_runs_data_parallel(monkeypatch, capsys):
    from online_dpo.config.compat import check_launch
    from online_dpo.config.recipe import recipe_from_dict

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = recipe_from_dict(minimal())
    check_launch(recipe, _accelerator("MULTI_CPU"))
    assert "accelerate runs FSDP on accelerators only" in capsys.readouterr().out


END_WORKER = """
import atexit, os, sys
import torch.distributed as dist
from online_dpo.training.distributed import end_finished_processes
marker = sys.argv[1]
atexit.register(lambda: open(marker + os.environ["RANK"], "w").write("interpreter teardown ran"))
dist.init_process_group("gloo")
end_finished_processes()
print("returned", flush=True)
"""


def test_finished_processes_end_without_the_interpreter_teardown(tmp_path):
    """A finished multi-process run ends each process at once, with code 0: the teardown is where
    gloo's and DeepSpeed's threads aborted processes (SIGABRT) after runs that had succeeded."""
    worker = tmp_path / "worker.py"
    worker.write_text(END_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "teardown_rank")]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "returned" not in done.stdout and not list(tmp_path.glob("teardown_rank*"))
