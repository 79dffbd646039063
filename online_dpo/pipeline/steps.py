"""The steps of a round, each `step(k) -> summary dict` writing its artifacts under round_<k>/.

    sample -> judge -> pairs -> train -> sync -> eval -> reference

They work on the parts the run built once from the recipe (objective, pair source, reference
schedule, checkpoints, sampler, judges) and never ask which mode the run is in. Process 0 runs
every step; the others join only the steps that change or read their models (`run.py` says which)
and hold no judge. Sampling goes through the run's sampler (online_dpo/sampling/samplers.py), which owns
the engines wherever they are.
"""

from __future__ import annotations

import random
import threading
import time

import datasets
import torch
from tqdm.auto import tqdm

from online_dpo.analysis.held_out import kl_estimate, sample_summary, win_rate
from online_dpo.faults import maybe_kill
from online_dpo.pipeline.pair_selection import FAILED, KEPT, TIE, judge_prompts
from online_dpo.pipeline.pair_sources import add_replay
from online_dpo.sampling.generator import SamplingSettings
from online_dpo.sampling.samplers import (
    StaleSampleError,
    check_weight_versions,
    policy_version,
    run_label,
)
from online_dpo.sampling.weight_sync import probe_tolerance, sampler_dtype
from online_dpo.storage.artifacts import (
    RunDir,
    read_json,
    read_jsonl,
    write_dir_atomic,
    write_json,
    write_jsonl,
)
from online_dpo.training.logprobs import score_sequences
from online_dpo.training.shared_scoring import SharedScores, score_shared


class JudgeFailureError(RuntimeError):
    pass


class ReferenceMismatchError(RuntimeError):
    pass


class RoundSteps:
    def __init__(self, recipe, run_dir: RunDir, procs, *, models, trainer, sampler, judges, objective,
                 source, reference, checkpoints, beta, pi0_cache, train_rows, eval_rows, policy_round,
                 schedule, draws):
        self.recipe, self.run_dir, self.procs = recipe, run_dir, procs
        # The eval step is process 0's; every other process scores its share of the held-out KL.
        procs.handlers["kl"] = self._kl
        # The sampler (online_dpo/sampling/samplers.py) hides where the engines are: process 0 or each process.
        self.models, self.trainer, self.sampler = models, trainer, sampler
        # Process 0 only (None elsewhere): the training judge, the eval judge and its scorer.
        self.judge_stack, self.eval_judge, self.eval_scorer = judges
        self.judge_concurrency = getattr(self.judge_stack, "concurrency", 1)  # judge.concurrency, resolved
        self.objective, self.source, self.reference = objective, source, reference
        self.checkpoints, self.beta, self.pi0_cache = checkpoints, beta, pi0_cache
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.policy_round = policy_round  # the round whose policy the trainer holds (0: pi_0)
        # generation.max_staleness: which policy samples each round, and the draws ahead of it.
        self.schedule, self.draws = schedule, draws
        self.engine_round: int | None = None  # the round whose policy the sampler holds, verified
        self.reference_cache_hits = 0

    # ------------------------------------------------------------------ sampling

    def ensure_engine_holds(self, policy_round: int) -> None:
        """The sampler must hold the policy of `policy_round`, verified, before it samples."""
        if self.engine_round == policy_round:
            return
        if policy_round or self.engine_round is not None:  # a trained policy arrives only by a sync
            raise RuntimeError(f"internal: the sampler holds round {self.engine_round}, sampling needs "
                               f"round {policy_round}, and no sync step put it there")
        # Untrained: the engine holds pi_0, whose probe log-probs were kept when the policy loaded.
        self.sampler.verify(self.models.pi0_probe, self.version(0))
        self.engine_round = 0

    def sync_policy(self) -> dict:
        """Every process: the gather of sharded weights and the probe forward are collective."""
        result = self.sampler.update_weights(self.trainer.policy, self.version(self.policy_round))
        self.engine_round = self.policy_round
        return {**result, "weight_version": self.version(self.policy_round)}

    def version(self, policy_round: int) -> str:
        return policy_version(run_label(self.recipe.name, self.run_dir.path), policy_round)

    def prompts_for_round(self, k: int) -> list[tuple[int, dict]]:
        """A seeded permutation of the training prompts, consumed in order and cycled. Round 0
        (offline collection from pi_0) takes the prompts of every round at once."""
        n, per = len(self.train_rows), self.recipe.data.prompts_per_round
        order = list(range(n))
        random.Random(self.recipe.seed).shuffle(order)
        start, count = ((k - 1) * per, per) if k else (0, per * self.recipe.rounds)
        return [(order[(start + i) % n], self.train_rows[order[(start + i) % n]]) for i in range(count)]

    def _sample(self, rows: list[dict], settings: SamplingSettings, policy_round: int | None = None,
                where: str = "held-out sampling") -> tuple[list[dict], dict]:
        policy_round = self.policy_round if policy_round is None else policy_round
        self.ensure_engine_holds(policy_round)
        records, stats = self.sampler.sample(rows, settings)
        check_weight_versions(records, self.version(policy_round), where)
        return records, {**stats, "policy_round": policy_round, "weight_version": self.version(policy_round)}

    def sample(self, k: int) -> dict:
        """Round k's prompts, sampled by the policy of round k - 1 (k - 1 - max_staleness when
        drawn ahead; the schedule says which)."""
        g = self.recipe.generation
        rows = self.prompts_for_round(k)
        settings = SamplingSettings(g.samples_per_prompt, g.temperature, g.top_p, g.max_tokens,
                                    seed=self.recipe.seed * 100_003 + k)
        # A round without pairs leaves the policy as it was: the sampler holds the latest one.
        sampler_round = min(self.schedule.sampler_round(k), self.policy_round)
        records, stats = self._sample([r for _, r in rows], settings, sampler_round, f"sampling for round {k}")
        for (index, _), rec in zip(rows, records, strict=True):
            rec["prompt_index"] = index
        write_jsonl(self.run_dir.round(k) / "samples.jsonl", records)
        # Rounds of training between the sampling policy and the one that trains on the samples.
        return {**stats, "prompts": len(rows), "staleness": max(0, k - 1 - sampler_round)}

    # ------------------------------------------------------------------ judging and pairs

    def judge(self, k: int) -> dict:
        records = read_jsonl(self.run_dir.round(k) / "samples.jsonl")
        rng = random.Random(self.recipe.seed * 7919 + k)
        pairs_cfg, judge_cfg = self.recipe.pairs, self.recipe.judge
        judgments = []
        prompts = [(rec["row"], [s["text"] for s in rec["samples"]]) for rec in records]
        if getattr(self.judge_stack, "pointwise", False) and pairs_cfg.strategy != "random":
            # A reward model scores the whole round at once, in batches across prompts.
            self.judge_stack.prefetch_scores([(row, text) for row, texts in prompts for text in texts])
        results = judge_prompts(self.judge_stack, prompts, pairs_cfg.strategy, rng, pairs_cfg.max_length_ratio,
                                concurrency=self.judge_concurrency)
        # A round judged ahead (generation.max_staleness) runs beside the trainer's bar: no bar of its own.
        progress = tqdm(total=len(records), desc=f"round {k} judge", leave=False,
                        disable=threading.current_thread() is not threading.main_thread())
        for i in range(len(prompts)):
            if i:
                maybe_kill(f"round_{k}/judge_prompt_{i}")  # i prompts judged (and cached), more in flight
            judgments.append(next(results))
            progress.update()
            progress.set_postfix(failed=sum(j["status"] == FAILED for j in judgments), refresh=False)
        progress.close()
        write_jsonl(self.run_dir.round(k) / "judgments.jsonl", judgments)
        counts = {s: sum(j["status"] == s for j in judgments) for s in (KEPT, TIE, FAILED)}
        if counts[FAILED] / max(len(judgments), 1) > judge_cfg.max_failure_rate:
            reasons = sorted({j["reason"] for j in judgments if j["status"] == FAILED})[:3]
            raise JudgeFailureError(
                f"round {k}: judge failed on {counts[FAILED]}/{len(judgments)} prompts "
                f"(> judge.max_failure_rate={judge_cfg.max_failure_rate}); e.g. {reasons}. "
                f"Judgments are in {self.run_dir.round(k) / 'judgments.jsonl'}")
        scores = [s for j in judgments for s in (j["scores"] or []) if s is not None]
        kept = [(rec, j) for rec, j in zip(records, judgments, strict=True) if j["status"] == KEPT]
        longer = [len(rec["samples"][j["chosen"]]["text"].split())
                  > len(rec["samples"][j["rejected"]]["text"].split()) for rec, j in kept]
        stats = {}
        layer = self.judge_stack  # BothOrders -> ReliableJudge -> the user's judge: each may keep stats
        while layer is not None:
            if hasattr(layer, "pop_stats"):
                stats.update(layer.pop_stats())
            layer = getattr(layer, "inner", None)
        return {"pairs_kept": counts[KEPT], "pairs_tied": counts[TIE], "pairs_failed": counts[FAILED],
                "judge_score": sum(scores) / len(scores) if scores else None,
                # How often the judge preferred the longer response: the classic length bias.
                "judge_prefers_longer": sum(longer) / len(longer) if longer else None, **stats}

    def pairs(self, k: int) -> dict:
        # Policy updates between the policy that sampled round k and the one about to train on it.
        staleness = self.source.staleness(k, self.policy_round)
        bound = self.recipe.generation.max_staleness
        if staleness is not None and staleness > bound:
            raise StaleSampleError(
                f"round {k}: its samples were drawn by the policy of round "
                f"{read_json(self.run_dir.round(k) / 'sample.json')['policy_round']}, "
                f"{staleness} updates before the policy that would train on them (round {self.policy_round}); "
                f"generation.max_staleness is {bound}. Refusing them before training.")
        columns = self.source.select(k)
        fresh = len(columns["prompt"])
        replayed = add_replay(self.run_dir, k, columns, self.recipe.pairs.replay_ratio, self.recipe.seed) if k else 0
        if columns["prompt"]:  # datasets cannot reload a 0-row folder; pairs.json says 0 instead
            ds = datasets.Dataset.from_dict(columns)
            write_dir_atomic(self.run_dir.round(k) / "pairs", lambda tmp: ds.save_to_disk(str(tmp)))
        return {**self.objective.describe(columns), "fresh_pairs": fresh, "replayed_pairs": replayed,
                "staleness": staleness}

    # ------------------------------------------------------------------ training

    def score(self, model, sequences) -> torch.Tensor:
        m = self.models
        return score_sequences(model, sequences, m.pad_id, m.device, padding_free=m.padding_free)

    def score_shared(self, model, sequences) -> SharedScores:
        """Every process: each scores its share, and every process gets all the values. In the
        trainer's autocast (bf16 on CUDA, none on CPU), so the float32 EMA reference computes in
        the compute dtype like every other frozen model."""
        m = self.models
        with m.accelerator.autocast():
            return score_shared(self.procs, model, sequences, m.pad_id, m.device, padding_free=m.padding_free,
                                collective=m.sharded_forward(model))

    def score_reference(self, sequences) -> tuple[torch.Tensor, list[int]]:
        """A reference forward pass (every process, each its share), before the round's first
        optimizer step; returns the log-probs and how many sequences each process scored. pi_0's
        results come from (and go to) process 0's cross-run cache, and the reference loads only
        for what it misses."""
        def forward(seqs) -> SharedScores:
            with self.reference.scoring(self.trainer.policy, self.policy_round) as model:
                return self.score_shared(model, seqs)

        if not (self.reference.is_pi0 and self.procs.agree(self.pi0_cache is not None)):
            scored = forward(sequences)
            return scored.values, scored.per_process
        logps, missing = self.procs.agree(self.pi0_cache.lookup(sequences) if self.procs.main else None)
        self.reference_cache_hits += len(sequences) - len(missing)
        if not missing:
            return logps, [0] * self.procs.world
        scored = forward([sequences[i] for i in missing])
        logps[missing] = scored.values
        if self.procs.main:
            self.pi0_cache.put([sequences[i] for i in missing], scored.values)
        return logps, scored.per_process

    def reference_logps(self, k: int, items, ds) -> tuple[torch.Tensor, str, list[int]]:
        """The objective's reference log-probs, where they came from, and how many sequences each
        process scored; free where the reference itself sampled them."""
        sequences = self.objective.reference_sequences(items)
        logps, sampler_rounds = self.objective.sampler_logps(ds)
        # Only a float32 sampler's log-probs are exact enough to stand in for a float32 forward.
        exact = sampler_dtype(self.recipe) == torch.float32
        reuse = [exact and self.reference.may_reuse_sampler(r) for r in sampler_rounds]
        forward = [i for i, ok in enumerate(reuse) if not ok]
        per_process = [0] * self.procs.world
        if forward:
            logps[forward], per_process = self.score_reference([sequences[i] for i in forward])
        if len(forward) < len(sequences):  # check one reused value against a real forward pass
            i = reuse.index(True)
            with self.reference.scoring(self.trainer.policy, self.policy_round) as model:
                diff = abs(self.score(model, [sequences[i]]).item() - logps[i].item())
            # The probe tolerance is per token; these are sums over whole completions.
            tol = probe_tolerance(self.recipe) * len(sequences[i][1])
            if diff > tol:
                raise ReferenceMismatchError(
                    f"round {k}: sampling log-probs differ from the reference by {diff:.3g} "
                    f"(> {tol:g}) although the reference sampled them")
        source = "forward" if len(forward) == len(sequences) else "sampler" if not forward else "mixed"
        return logps, source, per_process

    def train(self, k: int) -> dict:
        if read_json(self.run_dir.round(k) / "pairs.json")["pairs"] == 0:
            self.draws.settle()  # no new policy: its eval samples next, and alone
            return {"skipped": "no pairs this round", "train_pairs": 0, "optimizer_steps": 0}
        self.sampler.release()  # generation.sleep: the engine's memory is the trainer's until the sync
        ds = datasets.load_from_disk(str(self.run_dir.round(k) / "pairs"))
        items = self.objective.items(ds)
        t0, hits = time.perf_counter(), self.reference_cache_hits
        reference, source, per_process = self.reference_logps(k, items, ds)
        ref_seconds = time.perf_counter() - t0
        beta = self.beta.value(k)
        metrics = self.trainer.train_round(self.objective, items, reference, seed=self.recipe.seed * 31 + k,
                                           tag=f"round_{k}", beta=beta,
                                           on_step=self.reference.step_hook(k, self.trainer.policy), round_k=k)
        self.reference.after_training(k)
        # The draws of the policy before this one end first: a resume from this checkpoint syncs
        # this policy, and could no longer draw theirs (online_dpo/pipeline/draw_ahead.py).
        self.draws.settle()
        self.checkpoints.save_policy(k, self.trainer.policy, self.trainer.optimizer_state())
        self.policy_round = k
        return {**metrics, "beta": beta, "reference_seconds": ref_seconds, "reference_logps_from": source,
                "reference_cache_hits": self.reference_cache_hits - hits,
                # Sequences each process scored: the reference forwards are shared, about 1/N each.
                "reference_scored_per_process": per_process}

    def sync(self, k: int) -> dict:
        if self.policy_round != k:
            return {"skipped": "policy unchanged this round"}
        return self.sync_policy()

    # ------------------------------------------------------------------ evaluation and reference

    def _eval_settings(self) -> SamplingSettings:
        # Temperature 1, top_p 1: true policy samples, so the KL estimates are valid.
        return SamplingSettings(self.recipe.eval.samples_per_prompt, 1.0, 1.0, self.recipe.generation.max_tokens,
                                seed=self.recipe.seed * 100_003 + 50_000)

    def sample_pi0_eval(self) -> None:
        """pi_0's held-out samples, judged against every later round's (round_0/)."""
        self.sampler.verify(self.models.pi0_probe, self.version(0))
        records, stats = self.sampler.sample(self.eval_rows, self._eval_settings())
        check_weight_versions(records, self.version(0), "pi_0's held-out sampling")
        summary = sample_summary(records, self.eval_scorer)  # keeps each sample's eval_score in records
        write_jsonl(self.run_dir.round(0) / "pi0_eval_samples.jsonl", records)
        write_json(self.run_dir.round(0) / "pi0_eval.json", {**stats, **summary})

    @torch.no_grad()
    def evaluate(self, k: int) -> dict:
        """Held-out prompts: eval-judge score, length, EOS rate, KL to the round's reference (before
        any swap) and to pi_0, win rate against pi_0's samples, and adaptive beta's next value."""
        every = self.recipe.eval.every
        if k != self.recipe.rounds and (every == 0 or k % every):
            return {"skipped": f"eval.every={every}"}
        records, stats = self._sample(self.eval_rows, self._eval_settings())
        # The reference, then pi_0: each loaded for its KL and freed before the next (unless resident).
        kl_ref = self._kl(records, "reference")
        kl_pi0 = kl_ref if self.reference.is_pi0 else self._kl(records, "pi0")
        summary = sample_summary(records, self.eval_scorer)
        result = {"eval_judge_score": summary["judge_score"], "eval_judge_score_ci": summary["judge_score_ci"],
                  "eval_mean_length": summary["mean_length"],
                  "eval_eos_rate": summary["eos_rate"], "kl_to_reference": kl_ref, "kl_to_pi0": kl_pi0,
                  "eval_generation_seconds": stats["generation_seconds"],
                  **{f"eval_{key}": value for key, value in summary["judge_metrics"].items()}}
        if self.recipe.eval.win_rate_vs_pi0:
            wins = win_rate(self.eval_judge, records, read_jsonl(self.run_dir.round(0) / "pi0_eval_samples.jsonl"))
            for rec, counts in zip(records, wins["per_prompt"], strict=True):
                rec["vs_pi0"] = counts  # this prompt's wins/losses/ties/failed against pi_0
            result.update(win_rate_vs_pi0=wins["win_rate"], win_rate_vs_pi0_ci=wins["win_rate_ci"],
                          wins_vs_pi0=wins["wins"], losses_vs_pi0=wins["losses"], ties_vs_pi0=wins["ties"],
                          win_tie_rate_vs_pi0=wins["tie_rate"], win_failed_vs_pi0=wins["failed"])
        write_jsonl(self.run_dir.round(k) / "eval_samples.jsonl", records)  # with eval_score and vs_pi0
        return {**result, **self.beta.after_eval(k, kl_ref)}

    def _kl(self, records, against: str) -> float:
        """KL of the held-out samples to the reference or to pi_0 (`against`). Process 0 asks the
        others to join: each loads the same model and scores its share of the samples."""
        if self.procs.main:
            self.procs.ask("kl", records, against)
        frozen = self.reference.at_eval() if against == "reference" else self.models.frozen()
        with frozen as model:  # the model's last reference goes when this returns
            return kl_estimate(records, lambda sequences: self.score_shared(model, sequences).values)

    def update_reference(self, k: int) -> dict:
        return self.reference.update(k, self.trainer.policy, self.policy_round)
