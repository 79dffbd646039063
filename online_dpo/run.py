"""The round pipeline: sample -> judge -> select pairs -> train -> sync -> evaluate -> reference.

Every step writes its artifact atomically under runs/<name>/round_<k>/ and finishes by writing a
small `<step>.json` summary. A step whose summary exists is done and is never redone, so
`online-dpo run` on an interrupted run continues at the first missing artifact.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import datasets
import torch
import yaml
from tqdm.auto import tqdm

from judges.loading import build_judge_stack
from online_dpo.artifacts import (
    read_json,
    read_jsonl,
    write_dir_atomic,
    write_json,
    write_jsonl,
    write_text_atomic,
)
from online_dpo.config import Recipe, RecipeError, recipe_from_dict, recipe_to_dict
from online_dpo.data import load_prompt_rows, split_prompts
from online_dpo.engine import Models, build_generator, sync_and_verify, verify_engine
from online_dpo.faults import maybe_kill
from online_dpo.generation.base import SamplingSettings
from online_dpo.pairs import FAILED, KEPT, TIE, judge_samples
from online_dpo.reporting import finish_run, round_metrics
from online_dpo.trainer import DPOTrainer, Pair, pair_sequences, score_sequences

STEPS = ("sample", "judge", "pairs", "train", "sync", "eval", "reference")


class JudgeFailureError(RuntimeError):
    pass


class ReferenceMismatchError(RuntimeError):
    pass


def check_resolved_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Write the resolved recipe first; refuse to resume a run under a different recipe."""
    path = run_dir / "recipe.yaml"
    resolved = recipe_to_dict(recipe)
    if path.exists():
        previous = recipe_to_dict(recipe_from_dict(yaml.safe_load(path.read_text())))
        changed = sorted(_diff_keys(previous, resolved))
        # More rounds is the one change that extends a run without invalidating finished work.
        changed = [k for k in changed if k != "rounds"]
        if changed:
            raise RecipeError(
                f"{run_dir} was started with a different recipe (changed: {', '.join(changed)}); "
                "use a new name= to start a new run"
            )
    write_text_atomic(path, yaml.safe_dump(resolved, sort_keys=False))


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict) and key != "kwargs":
            out |= _diff_keys(va, vb, name + ".")
        elif va != vb:
            out.add(name)
    return out


class Run:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.dir = recipe.run_dir

    def round_dir(self, k: int) -> Path:
        return self.dir / f"round_{k}"

    def done(self, k: int, step: str) -> bool:
        return (self.round_dir(k) / f"{step}.json").exists()

    # ------------------------------------------------------------------ setup

    def execute(self) -> list[dict]:
        recipe = self.recipe
        # Cheap checks first: a bad judge or dataset fails before any model loads.
        self.judge, self.scorer = build_judge_stack(recipe.judge, self.dir / "judge_cache.jsonl")
        self.train_rows, self.eval_rows = split_prompts(
            load_prompt_rows(recipe.data.prompts), recipe.data.eval_prompts
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        check_resolved_recipe(recipe, self.dir)
        if all((self.round_dir(k) / "metrics.json").exists() for k in range(1, recipe.rounds + 1)):
            return finish_run(self.dir, recipe.rounds)

        torch.manual_seed(recipe.seed)
        self.models = Models(recipe)
        self.policy_round = self._restore_policy()
        self.reference_round = self._restore_reference()
        self.trainer = DPOTrainer(self.models.policy, recipe.loss, recipe.train,
                                  self.models.pad_id, self.models.accelerator)
        self.generator = build_generator(recipe, self.models.model_dir, self.models.eos_ids,
                                         self.models.pad_id)
        self.engine_round = None  # set only by a verified sync
        try:
            for k in range(1, recipe.rounds + 1):
                if not (self.round_dir(k) / "metrics.json").exists():
                    self.run_round(k)
        finally:
            self.generator.close()
        return finish_run(self.dir, recipe.rounds)

    def _latest_round_with(self, name: str, before: int | None = None) -> int:
        last = before if before is not None else self.recipe.rounds + 1
        for k in range(last - 1, 0, -1):
            if (self.round_dir(k) / name).exists():
                return k
        return 0

    def _restore_policy(self) -> int:
        k = self._latest_round_with("train.json")
        while k and not (self.round_dir(k) / "checkpoint").exists():
            k = self._latest_round_with("train.json", before=k)  # a round with no pairs
        if k:
            print(f"[online-dpo] resuming: policy from round_{k}/checkpoint", flush=True)
            state = self.models.load(self.round_dir(k) / "checkpoint").state_dict()
            self.models.policy.load_state_dict(state, strict=True)
        return k

    def _restore_reference(self) -> int:
        k = self._latest_round_with("reference.json")
        source = read_json(self.round_dir(k) / "reference.json")["source_round"] if k else 0
        if source:
            ref = self.models.load(self.round_dir(source) / "checkpoint")
            self.models.reference.load_state_dict(ref.state_dict(), strict=True)
        elif self.policy_round:
            base = self.models.load(self.models.model_dir)
            self.models.reference.load_state_dict(base.state_dict(), strict=True)
        return source

    # ------------------------------------------------------------------ one round

    def run_round(self, k: int) -> None:
        steps = {"sample": self.sample, "judge": self.judge_step, "pairs": self.select_pairs,
                 "train": self.train, "sync": self.sync, "eval": self.evaluate,
                 "reference": self.update_reference}
        for name in STEPS:
            if self.done(k, name):
                continue
            t0 = time.perf_counter()
            summary = steps[name](k)
            summary["seconds"] = time.perf_counter() - t0
            write_json(self.round_dir(k) / f"{name}.json", summary)
            maybe_kill(f"round_{k}/{name}")
        metrics = round_metrics(self.round_dir(k), k)
        write_json(self.round_dir(k) / "metrics.json", metrics)
        print(f"[online-dpo] round {k}: " + ", ".join(
            f"{key}={metrics[key]:.4g}" for key in ("judge_score", "loss", "accuracy", "kl_to_reference")
            if isinstance(metrics.get(key), float)), flush=True)

    def ensure_engine_current(self) -> None:
        """The sampler must hold the trainer's current policy, verified, before it samples."""
        if self.engine_round == self.policy_round:
            return
        if self.policy_round == 0:
            verify_engine(self.models, self.generator, self.recipe.generation.probe_tolerance)
        else:
            sync_and_verify(self.models, self.generator, self.recipe.generation.probe_tolerance)
        self.engine_round = self.policy_round

    def prompts_for_round(self, k: int) -> list[tuple[int, dict]]:
        """A seeded permutation of the training prompts, consumed in order and cycled."""
        n, per = len(self.train_rows), self.recipe.data.prompts_per_round
        order = list(range(n))
        random.Random(self.recipe.seed).shuffle(order)
        picks = [order[((k - 1) * per + i) % n] for i in range(per)]
        return [(i, self.train_rows[i]) for i in picks]

    def _sample(self, rows: list[dict], settings: SamplingSettings) -> tuple[list[dict], dict]:
        self.ensure_engine_current()
        prompt_ids = [self.models.prompt_ids(r["prompt"]) for r in rows]
        t0 = time.perf_counter()
        outputs = self.generator.generate(prompt_ids, settings)
        seconds = time.perf_counter() - t0
        tokenizer = self.models.tokenizer
        records, tokens = [], 0
        for row, ids, completions in zip(rows, prompt_ids, outputs):
            samples = []
            for c in completions:
                text = c.text or tokenizer.decode(c.token_ids, skip_special_tokens=True)
                tokens += len(c.token_ids)
                samples.append({"text": text, "token_ids": c.token_ids, "finished": c.finished,
                                "logp": float(sum(c.logprobs)), "num_tokens": len(c.token_ids)})
            records.append({"row": row, "prompt_ids": ids, "samples": samples})
        return records, {"generation_seconds": seconds, "sampled_tokens": tokens,
                         "tokens_per_second": tokens / max(seconds, 1e-9),
                         "policy_round": self.policy_round}

    def sample(self, k: int) -> dict:
        g = self.recipe.generation
        rows = self.prompts_for_round(k)
        settings = SamplingSettings(g.n, g.temperature, g.top_p, g.max_tokens, seed=self.recipe.seed * 100_003 + k)
        records, stats = self._sample([r for _, r in rows], settings)
        for (index, _), rec in zip(rows, records):
            rec["prompt_index"] = index
        write_jsonl(self.round_dir(k) / "samples.jsonl", records)
        return stats

    def judge_step(self, k: int) -> dict:
        records = read_jsonl(self.round_dir(k) / "samples.jsonl")
        rng = random.Random(self.recipe.seed * 7919 + k)
        judgments = []
        for rec in tqdm(records, desc=f"round {k} judge", leave=False):
            texts = [s["text"] for s in rec["samples"]]
            judgments.append(judge_samples(self.judge, rec["row"], texts, self.recipe.pairs.strategy,
                                           rng, self.recipe.judge.max_length_ratio))
        write_jsonl(self.round_dir(k) / "judgments.jsonl", judgments)
        counts = {s: sum(j["status"] == s for j in judgments) for s in (KEPT, TIE, FAILED)}
        failure_rate = counts[FAILED] / max(len(judgments), 1)
        if failure_rate > self.recipe.judge.max_failure_rate:
            reasons = sorted({j["reason"] for j in judgments if j["status"] == FAILED})[:3]
            raise JudgeFailureError(
                f"round {k}: judge failed on {counts[FAILED]}/{len(judgments)} prompts "
                f"(> judge.max_failure_rate={self.recipe.judge.max_failure_rate}); e.g. {reasons}. "
                f"Judgments are in {self.round_dir(k) / 'judgments.jsonl'}"
            )
        scores = [s for j in judgments for s in (j["scores"] or []) if s is not None]
        kept = [(rec, j) for rec, j in zip(records, judgments) if j["status"] == KEPT]
        longer = [len(rec["samples"][j["chosen"]]["text"].split())
                  > len(rec["samples"][j["rejected"]]["text"].split()) for rec, j in kept]
        stats = {}
        layer = self.judge  # BothOrders -> ReliableJudge -> the user's judge: each may keep stats
        while layer is not None:
            if hasattr(layer, "pop_stats"):
                stats.update(layer.pop_stats())
            layer = getattr(layer, "inner", None)
        return {"pairs_kept": counts[KEPT], "pairs_tied": counts[TIE], "pairs_failed": counts[FAILED],
                "judge_score": sum(scores) / len(scores) if scores else None,
                # How often the judge preferred the longer response: the classic length bias.
                "judge_prefers_longer": sum(longer) / len(longer) if longer else None, **stats}

    def select_pairs(self, k: int) -> dict:
        records = read_jsonl(self.round_dir(k) / "samples.jsonl")
        judgments = read_jsonl(self.round_dir(k) / "judgments.jsonl")
        columns = {c: [] for c in ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                                   "rejected_ids", "chosen_sample_logp", "rejected_sample_logp",
                                   "reason", "prompt_index")}
        for rec, j in zip(records, judgments):
            if j["status"] != KEPT:
                continue
            chosen, rejected = rec["samples"][j["chosen"]], rec["samples"][j["rejected"]]
            prompt = rec["row"]["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            columns["prompt"].append(messages)
            columns["chosen"].append([{"role": "assistant", "content": chosen["text"]}])
            columns["rejected"].append([{"role": "assistant", "content": rejected["text"]}])
            columns["prompt_ids"].append(rec["prompt_ids"])
            columns["chosen_ids"].append(chosen["token_ids"])
            columns["rejected_ids"].append(rejected["token_ids"])
            columns["chosen_sample_logp"].append(chosen["logp"])
            columns["rejected_sample_logp"].append(rejected["logp"])
            columns["reason"].append(j["reason"])
            columns["prompt_index"].append(rec["prompt_index"])
        if columns["prompt"]:  # datasets cannot reload a 0-row folder; pairs.json says 0 instead
            ds = datasets.Dataset.from_dict(columns)
            write_dir_atomic(self.round_dir(k) / "pairs", lambda tmp: ds.save_to_disk(str(tmp)))
        return {"pairs": len(columns["prompt"])}

    def reference_logps(self, k: int, pairs: list[Pair], ds) -> tuple[torch.Tensor, torch.Tensor, str]:
        sampler_round = read_json(self.round_dir(k) / "sample.json")["policy_round"]
        sequences = pair_sequences(pairs)
        if sampler_round == self.reference_round:
            # The reference is the policy that sampled: vLLM already returned the reference's
            # log-probs of these exact tokens (raw distribution). Check one pair, then reuse.
            chosen = torch.tensor(ds["chosen_sample_logp"])
            rejected = torch.tensor(ds["rejected_sample_logp"])
            check = score_sequences(self.models.reference, [sequences[0], sequences[len(pairs)]],
                                    self.models.pad_id, self.models.device)
            diff = (check - torch.stack([chosen[0], rejected[0]])).abs().max().item()
            # The probe tolerance is per token; these are sums over whole completions.
            tol = self.recipe.generation.probe_tolerance * max(len(s[1]) for s in sequences)
            if diff > tol:
                raise ReferenceMismatchError(
                    f"round {k}: sampling log-probs differ from the reference by {diff:.3g} "
                    f"(> {tol:g}) although the reference sampled them"
                )
            return chosen, rejected, "sampler"
        logps = score_sequences(self.models.reference, sequences, self.models.pad_id, self.models.device)
        return logps[:len(pairs)], logps[len(pairs):], "forward"

    def train(self, k: int) -> dict:
        if read_json(self.round_dir(k) / "pairs.json")["pairs"] == 0:
            return {"skipped": "no pairs this round", "train_pairs": 0}
        ds = datasets.load_from_disk(str(self.round_dir(k) / "pairs"))
        pairs = [Pair(p, c, r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        t0 = time.perf_counter()
        ref_c, ref_r, source = self.reference_logps(k, pairs, ds)
        ref_seconds = time.perf_counter() - t0
        metrics = self.trainer.train_round(pairs, ref_c, ref_r, seed=self.recipe.seed * 31 + k,
                                           tag=f"round_{k}")
        policy = self.models.accelerator.unwrap_model(self.trainer.policy)

        def save(tmp: Path) -> None:
            policy.save_pretrained(tmp, safe_serialization=True)
            self.models.tokenizer.save_pretrained(tmp)

        write_dir_atomic(self.round_dir(k) / "checkpoint", save)
        self.policy_round = k
        return {**metrics, "reference_seconds": ref_seconds, "reference_logps_from": source}

    def sync(self, k: int) -> dict:
        if self.policy_round != k:
            return {"skipped": "policy unchanged this round"}
        result = sync_and_verify(self.models, self.generator, self.recipe.generation.probe_tolerance)
        self.engine_round = k
        return result

    @torch.no_grad()
    def evaluate(self, k: int) -> dict:
        """Held-out prompts sampled at temperature 1: judge score, length, EOS rate, and the
        Monte-Carlo KL estimate E_y~pi[log pi(y) - log ref(y)] to the round's reference."""
        g = self.recipe.generation
        settings = SamplingSettings(2, 1.0, 1.0, g.max_tokens, seed=self.recipe.seed * 100_003 + 50_000)
        records, stats = self._sample(self.eval_rows, settings)
        sequences, policy_logps, scores = [], [], []
        for rec in records:
            for s in rec["samples"]:
                sequences.append((rec["prompt_ids"], s["token_ids"]))
                policy_logps.append(s["logp"])
                scores.append(self.scorer.score(rec["row"], s["text"])[0] if self.scorer else None)
        ref = score_sequences(self.models.reference, sequences, self.models.pad_id, self.models.device)
        kl = (torch.tensor(policy_logps) - ref).mean().item()
        samples = [s for rec in records for s in rec["samples"]]
        valid = [s for s in scores if s is not None]
        write_jsonl(self.round_dir(k) / "eval_samples.jsonl", records)
        return {"eval_judge_score": sum(valid) / len(valid) if valid else None,
                "kl_to_reference": kl,
                "eval_mean_length": sum(s["num_tokens"] for s in samples) / len(samples),
                "eval_eos_rate": sum(s["finished"] for s in samples) / len(samples),
                "eval_generation_seconds": stats["generation_seconds"]}

    def update_reference(self, k: int) -> dict:
        ref = self.recipe.reference
        if ref.schedule == "swap" and k % ref.every == 0 and self.policy_round == k:
            self.models.set_reference(self.trainer.policy)
            self.reference_round = k
        return {"source_round": self.reference_round, "schedule": ref.schedule}


def run_recipe(recipe: Recipe) -> list[dict]:
    return Run(recipe).execute()

