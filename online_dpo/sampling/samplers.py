"""Samplers: the one interface the round's steps call to sample and to keep the engines current.

    sample(rows, settings)          -> (records, stats)  records in the rows' order (process 0)
    update_weights(model, version)  -> sync summary      every process: push the weights, verify
    verify(model, version)          -> probe diff        this process's engine against `model` (pi_0)
    close()

Weight versions. Once the probe proves an engine's weights, they are labelled `version`
(`policy_version`: the run's name and the policy's round) and every sample records the label of
the weights that drew it; the round's steps refuse samples whose label is not the policy's.

`generation.backend` and `generation.engines` choose one implementation when the run is built; no
step asks which:
- process0 (`InProcessSampler`): process 0 owns the only engine and samples every prompt; the
  other processes hold none and only join the collective parts of a sync (gathers, probe forward).
  With generation.backend: vllm_server that engine is a separate `vllm serve`, driven over HTTP
  through vLLM's RL API (online_dpo/sampling/vllm_server.py): the same sampler, another engine.
- every_process (`PerProcessSampler`): each process owns an engine. Process 0 runs the steps
  that sample, and while it does the others serve its requests: each samples a contiguous shard
  of the prompts and process 0 gathers the records back in prompt order. Seeds are per prompt
  (vLLM gets `settings.seed + i` for prompt i), so a shard starting at prompt `start` is sampled
  with seed `settings.seed + start` and the samples equal a one-process run's whatever the number
  of processes. The transformers backend seeds per call, not per prompt: it samples fine per
  process, but then its samples depend on the number of processes. Every engine is verified
  against pi_0 when built and by the probe after every update; `sync.json` lists each process's
  probe difference, and a failed probe on any process stops every process (no hang).

`run_on_main(work)` is how the run executes a step that only process 0 runs: process 0 does
`work()`, and the other processes serve its sampling requests until it is done.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import gather_object

from online_dpo.analysis.held_out import sample_records
from online_dpo.sampling.generator import SamplingSettings
from online_dpo.sampling.placement import (
    check_engine_fits,
    colocated_budget,
    shares_the_trainers_gpu,
)
from online_dpo.sampling.weight_sync import (
    WeightSyncError,
    build_generator,
    probe_tolerance,
    sync_and_verify,
    verify_engine,
)


class InProcessSampler:
    """generation.engines: process0 (the default): one engine, on process 0."""

    def __init__(self, models, generator, tolerance: float, procs):
        self.models, self.generator, self.tolerance, self.procs = models, generator, tolerance, procs

    def sample(self, rows: list[dict], settings: SamplingSettings) -> tuple[list[dict], dict]:
        return sample_records(self.models, self.generator, rows, settings)

    def verify(self, model=None, version: str | None = None) -> float | None:
        return verify_engine(self.models, self.generator, self.tolerance, model, version)

    def update_weights(self, model=None, version: str | None = None) -> dict:
        return sync_and_verify(self.models, self.generator, self.tolerance, model, version)

    def release(self) -> None:
        """Before training: an engine in sleep mode frees its memory; the next sync wakes it."""
        if self.generator is not None:
            self.generator.release()

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()


class ServerSampler(InProcessSampler):
    """generation.backend: vllm_server: process 0 drives a separate `vllm serve`. A server outlives
    runs, so when a run starts it may hold another run's weights: verifying pi_0 first pushes pi_0
    unless the server's weight label says it holds it already."""

    def verify(self, model=None, version: str | None = None) -> float | None:
        if self.generator is None:
            return super().verify(model, version)
        held = self.generator.holds(version)
        if not held:
            self.generator.load_model_folder(self.models.model_dir)
        try:
            return super().verify(model, version)
        except WeightSyncError:
            if not held:
                raise
            # Labelled pi_0 but not pi_0 (another run of the same name and folder updated it): push it.
            self.generator.load_model_folder(self.models.model_dir)
            return super().verify(model, version)


class SamplingError(RuntimeError):
    pass


class PerProcessSampler(InProcessSampler):
    """generation.engines: every_process: an engine on each process, each sampling its shard."""

    def __init__(self, models, generator, tolerance: float, procs, pi0_version: str | None = None):
        super().__init__(models, generator, tolerance, procs)
        self.rank = procs.state.process_index
        procs.handlers["sample"] = self._sample_shard  # while process 0 runs a step (Processes.serve)
        # A fresh engine holds pi_0: check every one now, while every process is here.
        self._check([self._probe(models.pi0_probe, version=pi0_version)[1]], "when built")

    # ------------------------------------------------------------------ sampling

    def sample(self, rows: list[dict], settings: SamplingSettings) -> tuple[list[dict], dict]:
        """Process 0, while the others serve (`Processes.serve`): every process samples its shard."""
        t0 = time.perf_counter()
        self.procs.ask("sample", rows, settings)
        records, tokens = self._sample_shard(rows, settings)
        seconds = time.perf_counter() - t0
        return records, {"generation_seconds": seconds, "sampled_tokens": tokens,
                         "tokens_per_second": tokens / max(seconds, 1e-9)}

    def _sample_shard(self, rows: list[dict], settings: SamplingSettings) -> tuple[list[dict], int]:
        start, end = shard_bounds(len(rows), self.rank, self.procs.world)
        try:
            records, stats = sample_records(self.models, self.generator, rows[start:end],
                                            replace(settings, seed=settings.seed + start))  # seeds per prompt
            part = (records, stats["sampled_tokens"], None)
        except Exception as e:  # noqa: BLE001 - every process must reach the gather, or all hang
            part = ([], 0, f"process {self.rank}: {type(e).__name__}: {e}")
        parts = gather_object([part])  # in process order = prompt order
        errors = [error for _, _, error in parts if error]
        if errors:  # every process raises together; none is left waiting in a collective
            self.procs.broken = True
            raise SamplingError(f"sampling failed on {len(errors)} of {len(parts)} processes: {errors[0]}")
        return [r for records, _, _ in parts for r in records], sum(tokens for _, tokens, _ in parts)

    def close(self) -> None:
        # vLLM found the run's process group initialized and adopted it as its own world, so its
        # shutdown destroys it while the run still needs it (its last barrier): keep it.
        destroy = torch.distributed.destroy_process_group
        torch.distributed.destroy_process_group = lambda *args, **kwargs: None
        try:
            super().close()
        finally:
            torch.distributed.destroy_process_group = destroy

    # ------------------------------------------------------------------ weights

    def update_weights(self, model=None, version: str | None = None) -> dict:
        """Every process: gather the weights (collective when sharded), load them into this
        process's engine, probe it; then every process checks every engine's probe."""
        result, diff = self._probe(model, sync=True, version=version)
        diffs = self._check(gather_object([diff]), "after the weight sync")
        return {**result, "probe_max_abs_diff": max(diffs), "probe_tolerance": self.tolerance,
                "probe_max_abs_diff_per_process": diffs}

    def _probe(self, model, sync: bool = False, version: str | None = None) -> tuple[dict, float]:
        """This engine's probe difference; NaN when it is NaN (checked by every process later,
        so one failing process never leaves the others waiting in a collective)."""
        try:
            if sync:
                result = sync_and_verify(self.models, self.generator, math.inf, model, version)
                return result, result["probe_max_abs_diff"]
            return {}, verify_engine(self.models, self.generator, math.inf, model, version)
        except WeightSyncError:  # at an infinite tolerance only a NaN difference raises
            return {}, math.nan

    def _check(self, diffs: list[float], when: str) -> list[float]:
        for rank, diff in enumerate(diffs):
            if not diff <= self.tolerance:
                raise WeightSyncError(
                    f"the sampler on process {rank} disagrees with the trainer {when}: max per-token "
                    f"log-prob difference {diff:.3g} > generation.probe_tolerance={self.tolerance:g}. "
                    "It may hold stale weights; stopping rather than sampling from the wrong policy.")
        return diffs


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Process `rank`'s contiguous share [start, end) of n prompts; sizes differ by at most one."""
    return rank * n // world, (rank + 1) * n // world


def run_label(run_name: str, run_dir) -> str:
    """A run's name and a hash of its folder: two runs that share a name (and a server) keep apart."""
    return f"{run_name}#{hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]}"


def policy_version(run: str, policy_round: int) -> str:
    """The label of a run's policy (`run_label`) after `policy_round` rounds of training (0: pi_0)."""
    return f"{run}@round-{policy_round}"


class StaleSampleError(RuntimeError):
    pass


def check_weight_versions(records: list[dict], expected: str, where: str) -> None:
    """Refuse samples drawn by weights other than the policy's (before anything trains on them)."""
    for record in records:
        for sample in record["samples"]:
            if sample.get("weight_version") != expected:
                raise StaleSampleError(
                    f"{where}: a sample was drawn by weights {sample.get('weight_version')!r}, not by the "
                    f"policy {expected!r}; refusing it before training. The sampler holds stale or "
                    "unverified weights (e.g. another trainer updated the server): rerun to re-sync.")


def build_sampler(recipe, models, procs, run_dir=None) -> InProcessSampler:
    def generator():
        if torch.cuda.is_available() and shares_the_trainers_gpu(recipe.generation):
            check_engine_fits(colocated_budget(recipe, models))  # vLLM's own check misses training
        return build_generator(recipe, models.model_dir, models.eos_ids, models.pad_id, run_dir)

    tolerance = probe_tolerance(recipe)
    if recipe.generation.engines == "every_process":
        if recipe.generation.tensor_parallel_size > 1:
            raise ValueError("generation.engines: every_process runs one engine per process on that "
                             "process's device; it cannot use generation.tensor_parallel_size > 1")
        return PerProcessSampler(models, generator(), tolerance, procs,
                                 policy_version(run_label(recipe.name, run_dir or recipe.run_dir), 0))
    if recipe.generation.backend == "vllm_server":
        return ServerSampler(models, generator() if procs.main else None, tolerance, procs)
    return InProcessSampler(models, generator() if procs.main else None, tolerance, procs)
