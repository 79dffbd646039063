"""The round pipeline: sample -> judge -> select pairs -> train -> sync -> evaluate -> reference.

Every step writes its artifact atomically under runs/<name>/round_<k>/ and finishes by writing a
small `<step>.json` summary. A step whose summary exists is done and is never redone, so
`online-dpo run` on an interrupted run continues at the first missing artifact.

Offline mode (`mode: offline`) trains the same way on a fixed dataset: either `data.pairs`, or
pairs sampled and judged once from pi_0 in round_0/. Its rounds skip sample and judge.

Launched with several processes, process 0 runs every step and writes every artifact; the
others join the steps that change or read their models (train, sync, reference) and wait at
the rest.
"""

from __future__ import annotations

import random
import shutil
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
from online_dpo.distributed import Processes
from online_dpo.engine import (
    Models,
    build_generator,
    probe_tolerance,
    sampler_dtype,
    sync_and_verify,
    verify_engine,
)
from online_dpo.evaluation import kl_estimate, sample_records, sample_summary, win_rate
from online_dpo.faults import maybe_kill
from online_dpo.generation.base import SamplingSettings
from online_dpo.lora import load_adapter, merged_state_dict, save_adapter
from online_dpo.losses import LossType
from online_dpo.offline import (
    PAIR_COLUMNS,
    example_columns_from_dataset,
    load_preference_rows,
    pair_columns_from_dataset,
    take_slice,
)
from online_dpo.pairs import FAILED, KEPT, TIE, example_columns, judge_samples, pair_columns
from online_dpo.ref_cache import ReferenceLogpCache, model_fingerprint
from online_dpo.reporting import finish_run, round_metrics
from online_dpo.schedules import next_beta, soft_update
from online_dpo.trainer import DPOTrainer, Example, Pair, pair_sequences, score_sequences

ONLINE_STEPS = ("sample", "judge", "pairs", "train", "sync", "eval", "reference")
# Steps that change every process's models, or read the policy whole (a gather when sharded).
EVERY_PROCESS = ("train", "sync", "reference")
OFFLINE_STEPS = ("pairs", "train", "sync", "eval", "reference")
STEPS = ONLINE_STEPS
EMA = -1  # reference_round of an EMA reference: a blend, never equal to a sampling policy


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
        # More rounds is the one change that extends a run without invalidating finished work.
        changed = [k for k in sorted(_diff_keys(previous, resolved)) if k != "rounds"]
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
        self.offline = recipe.mode == "offline"

    def round_dir(self, k: int) -> Path:
        return self.dir / f"round_{k}"

    def done(self, k: int, step: str) -> bool:
        return (self.round_dir(k) / f"{step}.json").exists()

    # ------------------------------------------------------------------ setup

    def execute(self) -> list[dict]:
        recipe = self.recipe
        procs = self.procs = Processes()
        self.main = procs.main
        self.kto = not LossType(recipe.loss.loss_type).paired
        self.judge = self.scorer = self.eval_judge = self.eval_scorer = None
        # Cheap checks first: a bad judge or dataset fails before any model loads.
        if self.main:  # process 0 alone judges and writes the run directory
            self.judge, self.scorer = build_judge_stack(recipe.judge, self.dir / "judge_cache.jsonl")
            eval_cfg = recipe.eval.judge or recipe.judge
            self.eval_judge, self.eval_scorer = build_judge_stack(eval_cfg, self.dir / "eval_judge_cache.jsonl")
            if self.kto and self.scorer is None and not (self.offline and recipe.data.pairs):
                raise RecipeError("loss.loss_type: kto labels samples by score; judge "
                                  f"{recipe.judge.target} is not a pointwise judge")
        self.train_rows, self.eval_rows = split_prompts(
            load_prompt_rows(recipe.data.prompts), recipe.data.eval_prompts
        )
        if self.offline and recipe.data.pairs is not None and not self.kto:
            load_preference_rows(recipe.data.pairs)  # validate columns before loading models
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            check_resolved_recipe(recipe, self.dir)
        procs.barrier()
        if procs.agree(all((self.round_dir(k) / "metrics.json").exists() for k in range(1, recipe.rounds + 1))):
            return finish_run(self.dir, recipe.rounds) if self.main else []

        torch.manual_seed(recipe.seed)
        self.models = Models(recipe)
        self.policy_round = self._restore_policy()
        self.reference_round = self._restore_reference()
        self.reference_cache_hits = 0  # sequences whose pi_0 log-probs came from the cross-run cache
        self.trainer = DPOTrainer(self.models.policy, recipe.loss, recipe.train,
                                  self.models.pad_id, self.models.accelerator)
        self.generator = None
        if self.main:
            self.generator = build_generator(recipe, self.models.model_dir, self.models.eos_ids,
                                             self.models.pad_id)
        self.engine_round = None  # set only by a verified sync
        try:
            # pi_0 work first, while the fresh engine still holds pi_0's weights.
            if self.main and recipe.eval.win_rate_vs_pi0 and not (self.round_dir(0) / "pi0_eval.json").exists():
                self.sample_pi0_eval()
            if self.policy_round:  # resumed: the fresh engine holds pi_0; every process joins the gather
                sync_and_verify(self.models, self.generator, probe_tolerance(recipe), self.trainer.policy)
                self.engine_round = self.policy_round
            if self.offline and recipe.data.pairs is None:
                for name, step in (("sample", self.sample), ("judge", self.judge_step),
                                   ("pairs", self.select_pairs)):
                    self.run_step(0, name, step)
            for k in range(1, recipe.rounds + 1):
                if not procs.agree((self.round_dir(k) / "metrics.json").exists()):
                    self.run_round(k)
        finally:
            if self.generator is not None:
                self.generator.close()
        procs.barrier()
        return finish_run(self.dir, recipe.rounds) if self.main else []

    def _latest_round_with(self, name: str, before: int | None = None) -> int:
        last = before if before is not None else self.recipe.rounds + 1
        for k in range(last - 1, 0, -1):
            if (self.round_dir(k) / name).exists():
                return k
        return 0

    def _load_into(self, model, folder: Path) -> None:
        model.load_state_dict(self.models.load(folder).state_dict(), strict=True)

    def _restore_policy(self) -> int:
        k = self._latest_round_with("train.json")
        while k and not (self.round_dir(k) / "checkpoint").exists():
            k = self._latest_round_with("train.json", before=k)  # a round with no pairs
        if k:
            print(f"[online-dpo] resuming: policy from round_{k}/checkpoint", flush=True)
            if self.models.lora is not None:
                load_adapter(self.models.policy, self.round_dir(k) / "checkpoint")
            else:
                self._load_into(self.models.policy, self.round_dir(k) / "checkpoint")
        return k

    def _restore_reference(self) -> int:
        if self.recipe.reference.schedule == "ema":
            # The EMA reference changes inside training; its latest state is saved with train.json.
            k = self._latest_round_with("reference_checkpoint")
            if k and (self.round_dir(k) / "train.json").exists():
                self._load_into(self.models.reference, self.round_dir(k) / "reference_checkpoint")
                return EMA
            if self.policy_round:
                self._load_into(self.models.reference, self.models.model_dir)
            return 0
        k = self._latest_round_with("reference.json")
        source = read_json(self.round_dir(k) / "reference.json")["source_round"] if k else 0
        if source > 0:
            self._load_into(self.models.reference, self.round_dir(source) / "checkpoint")
        elif self.policy_round and self.models.lora is None:  # LoRA's reference is the untouched base
            self._load_into(self.models.reference, self.models.model_dir)
        return source

    # ------------------------------------------------------------------ one round

    def run_step(self, k: int, name: str, step) -> None:
        if self.procs.agree(self.done(k, name)):
            return
        if self.main or name in EVERY_PROCESS:
            t0 = time.perf_counter()
            summary = step(k)
            summary["seconds"] = time.perf_counter() - t0
            if self.main:
                write_json(self.round_dir(k) / f"{name}.json", summary)
        self.procs.barrier()  # the others wait for process 0's artifacts
        maybe_kill(f"round_{k}/{name}")

    def run_round(self, k: int) -> None:
        steps = {"sample": self.sample, "judge": self.judge_step, "pairs": self.select_pairs,
                 "train": self.train, "sync": self.sync, "eval": self.evaluate,
                 "reference": self.update_reference}
        for name in OFFLINE_STEPS if self.offline else ONLINE_STEPS:
            self.run_step(k, name, steps[name])
        if not self.main:
            return
        metrics = round_metrics(self.round_dir(k), k, self.dir)
        write_json(self.round_dir(k) / "metrics.json", metrics)
        self.prune_checkpoints(k)
        print(f"[online-dpo] round {k}: " + ", ".join(
            f"{key}={metrics[key]:.4g}" for key in ("judge_score", "loss", "accuracy", "kl_to_reference",
                                                     "win_rate_vs_pi0")
            if isinstance(metrics.get(key), float)), flush=True)

    def ensure_engine_current(self) -> None:
        """The sampler must hold the trainer's current policy, verified, before it samples."""
        if self.engine_round == self.policy_round:
            return
        if self.policy_round:  # a trained policy reaches the engine only through a sync step
            raise RuntimeError(f"internal: the sampler holds round {self.engine_round}, the policy is "
                               f"round {self.policy_round}, and no sync step ran")
        # Untrained: pi_0 has the policy's weights, and unlike a sharded policy it is whole here.
        verify_engine(self.models, self.generator, probe_tolerance(self.recipe), self.models.pi0)
        self.engine_round = 0

    def prompts_for_round(self, k: int) -> list[tuple[int, dict]]:
        """A seeded permutation of the training prompts, consumed in order and cycled. Round 0
        (offline collection from pi_0) takes the prompts of every round at once."""
        n, per = len(self.train_rows), self.recipe.data.prompts_per_round
        order = list(range(n))
        random.Random(self.recipe.seed).shuffle(order)
        start, count = ((k - 1) * per, per) if k else (0, per * self.recipe.rounds)
        return [(order[(start + i) % n], self.train_rows[order[(start + i) % n]]) for i in range(count)]

    def _sample(self, rows: list[dict], settings: SamplingSettings) -> tuple[list[dict], dict]:
        self.ensure_engine_current()
        records, stats = sample_records(self.models, self.generator, rows, settings)
        return records, {**stats, "policy_round": self.policy_round}

    def sample(self, k: int) -> dict:
        g = self.recipe.generation
        rows = self.prompts_for_round(k)
        settings = SamplingSettings(g.n, g.temperature, g.top_p, g.max_tokens, seed=self.recipe.seed * 100_003 + k)
        records, stats = self._sample([r for _, r in rows], settings)
        for (index, _), rec in zip(rows, records, strict=True):
            rec["prompt_index"] = index
        write_jsonl(self.round_dir(k) / "samples.jsonl", records)
        return {**stats, "prompts": len(rows)}

    def judge_step(self, k: int) -> dict:
        records = read_jsonl(self.round_dir(k) / "samples.jsonl")
        rng = random.Random(self.recipe.seed * 7919 + k)
        judgments = []
        for i, rec in enumerate(tqdm(records, desc=f"round {k} judge", leave=False)):
            if i:
                maybe_kill(f"round_{k}/judge_prompt_{i}")  # i prompts judged (and cached)
            texts = [s["text"] for s in rec["samples"]]
            # KTO labels every sample by its score, so every sample must be scored.
            strategy = "best_vs_worst" if self.kto else self.recipe.pairs.strategy
            judgments.append(judge_samples(self.judge, rec["row"], texts, strategy,
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
        kept = [(rec, j) for rec, j in zip(records, judgments, strict=True) if j["status"] == KEPT]
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

    def _round_outputs(self, k: int) -> tuple[list[dict], list[dict], int]:
        d = self.round_dir(k)
        return read_jsonl(d / "samples.jsonl"), read_jsonl(d / "judgments.jsonl"), read_json(d / "sample.json")["policy_round"]

    def _select_examples(self, k: int) -> dict:
        if self.offline and self.recipe.data.pairs is not None:
            if not hasattr(self, "_offline_pool"):
                self._offline_pool = example_columns_from_dataset(self.recipe.data.pairs, self.models)
            per = 2 * self.recipe.data.prompts_per_round
            columns = take_slice(self._offline_pool, (k - 1) * per, per)
        else:
            columns = example_columns(*self._round_outputs(k), self.recipe.loss.kto_threshold)
        if columns["prompt"]:
            ds = datasets.Dataset.from_dict(columns)
            write_dir_atomic(self.round_dir(k) / "pairs", lambda tmp: ds.save_to_disk(str(tmp)))
        desirable = sum(columns["label"])
        return {"pairs": len(columns["prompt"]), "examples": len(columns["prompt"]),
                "desirable": desirable, "undesirable": len(columns["label"]) - desirable}

    def select_pairs(self, k: int) -> dict:
        if self.kto:
            return self._select_examples(k)
        if self.offline and k > 0:
            if self.recipe.data.pairs is not None:
                if not hasattr(self, "_offline_pool"):  # tokenize the dataset once per process
                    self._offline_pool = pair_columns_from_dataset(self.recipe.data.pairs, self.models)
                pool = self._offline_pool
            elif (self.round_dir(0) / "pairs").exists():
                pool = datasets.load_from_disk(str(self.round_dir(0) / "pairs")).to_dict()
            else:
                raise RuntimeError(f"{self.round_dir(0)}: sampling from pi_0 gave no decided pairs "
                                   "(every prompt tied or failed); offline mode has nothing to train on")
            per = self.recipe.data.prompts_per_round
            columns = take_slice(pool, (k - 1) * per, per)
        else:
            columns = pair_columns(*self._round_outputs(k))
        fresh = len(columns["prompt"])
        replayed = self._add_replay(k, columns) if k > 0 else 0
        if columns["prompt"]:  # datasets cannot reload a 0-row folder; pairs.json says 0 instead
            ds = datasets.Dataset.from_dict(columns)
            write_dir_atomic(self.round_dir(k) / "pairs", lambda tmp: ds.save_to_disk(str(tmp)))
        return {"pairs": len(columns["prompt"]), "fresh_pairs": fresh, "replayed_pairs": replayed}

    def _add_replay(self, k: int, columns: dict[str, list]) -> int:
        """Mix in earlier rounds' pairs (pairs.replay_ratio per fresh pair), seeded per round."""
        want = round(self.recipe.pairs.replay_ratio * len(columns["prompt"]))
        if want == 0:
            return 0
        old = [self.round_dir(j) / "pairs" for j in range(1, k) if (self.round_dir(j) / "pairs").exists()]
        if not old:
            return 0
        pool = datasets.concatenate_datasets([datasets.load_from_disk(str(p)) for p in old])
        pool = pool.filter(lambda r: not r["replay"])  # replay only fresh pairs, never replays
        picks = random.Random(self.recipe.seed * 131 + k).sample(range(len(pool)), min(want, len(pool)))
        for row in pool.select(picks):
            for c in PAIR_COLUMNS:
                columns[c].append(True if c == "replay" else row[c])
        return len(picks)

    def score(self, model, sequences) -> torch.Tensor:
        m = self.models
        return score_sequences(model, sequences, m.pad_id, m.device, padding_free=m.padding_free)

    def score_reference(self, sequences) -> torch.Tensor:
        """A reference forward pass; pi_0's results come from (and go to) the cross-run cache."""
        if self.reference_round != 0 or not self.recipe.reference.cache_logps or not self.main:
            return self.score(self.models.reference, sequences)
        if not hasattr(self, "_ref_cache"):
            m = self.models
            self._ref_cache = ReferenceLogpCache(model_fingerprint(
                m.model_dir, dtype=next(m.policy.parameters()).dtype, device=m.device.type,
                padding_free=m.padding_free))
        logps, hits = self._ref_cache.score(sequences, lambda seqs: self.score(self.models.reference, seqs))
        self.reference_cache_hits += hits
        return logps

    def reference_logps(self, k: int, pairs: list[Pair], ds) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Reference log-probs; free for pairs sampled by the reference itself (vLLM returned them)."""
        sequences = pair_sequences(pairs)
        n = len(pairs)
        # Only a float32 sampler's log-probs are exact enough to stand in for a float32 forward.
        exact = sampler_dtype(self.recipe) == torch.float32
        reuse = [exact and r == self.reference_round and self.reference_round != EMA
                 for r in ds["sampler_round"]]
        chosen = torch.tensor(ds["chosen_sample_logp"])
        rejected = torch.tensor(ds["rejected_sample_logp"])
        forward = [i for i in range(n) if not reuse[i]]
        if forward:
            seqs = [sequences[i] for i in forward] + [sequences[n + i] for i in forward]
            logps = self.score_reference(seqs)
            chosen[forward], rejected[forward] = logps[:len(forward)], logps[len(forward):]
        if len(forward) < n:
            # Check one reused pair against a real forward pass of the reference.
            i = reuse.index(True)
            check = self.score(self.models.reference, [sequences[i], sequences[n + i]])
            diff = (check - torch.stack([chosen[i], rejected[i]])).abs().max().item()
            # The probe tolerance is per token; these are sums over whole completions.
            tol = probe_tolerance(self.recipe) * max(len(s[1]) for s in sequences)
            if diff > tol:
                raise ReferenceMismatchError(
                    f"round {k}: sampling log-probs differ from the reference by {diff:.3g} "
                    f"(> {tol:g}) although the reference sampled them"
                )
        source = "forward" if len(forward) == n else "sampler" if not forward else "mixed"
        return chosen, rejected, source

    def current_beta(self, k: int) -> float:
        """Adaptive beta is carried from round to round in eval.json, so resume reproduces it."""
        if self.recipe.loss.target_kl is None or k <= 1:
            return self.recipe.loss.beta
        return read_json(self.round_dir(k - 1) / "eval.json")["beta_next"]

    def train(self, k: int) -> dict:
        if read_json(self.round_dir(k) / "pairs.json")["pairs"] == 0:
            return {"skipped": "no pairs this round", "train_pairs": 0, "optimizer_steps": 0}
        ds = datasets.load_from_disk(str(self.round_dir(k) / "pairs"))
        if self.kto:
            return self._train_kto(k, ds)
        pairs = [Pair(p, c, r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)]
        t0, hits = time.perf_counter(), self.reference_cache_hits
        ref_c, ref_r, source = self.reference_logps(k, pairs, ds)
        ref_seconds = time.perf_counter() - t0
        beta = self.current_beta(k)
        on_step = self._ema_hook(k) if self.recipe.reference.schedule == "ema" else None
        metrics = self.trainer.train_round(pairs, ref_c, ref_r, seed=self.recipe.seed * 31 + k,
                                           tag=f"round_{k}", beta=beta, on_step=on_step)
        self._save_checkpoints(k, ema=on_step is not None)
        return {**metrics, "beta": beta, "reference_seconds": ref_seconds, "reference_logps_from": source,
                "reference_cache_hits": self.reference_cache_hits - hits}

    def _train_kto(self, k: int, ds) -> dict:
        examples = [Example(p, c, bool(label)) for p, c, label in
                    zip(ds["prompt_ids"], ds["completion_ids"], ds["label"], strict=True)]
        t0, hits = time.perf_counter(), self.reference_cache_hits
        # Only a float32 sampler's log-probs are exact enough to stand in for a float32 forward.
        exact = sampler_dtype(self.recipe) == torch.float32
        reuse = [exact and r == self.reference_round and self.reference_round != EMA
                 for r in ds["sampler_round"]]
        ref = torch.tensor(ds["sample_logp"])
        forward = [i for i, ok in enumerate(reuse) if not ok]
        if forward:
            ref[forward] = self.score_reference([(examples[i].prompt_ids, examples[i].completion_ids)
                                                 for i in forward])
        ref_seconds = time.perf_counter() - t0
        beta = self.current_beta(k)
        on_step = self._ema_hook(k) if self.recipe.reference.schedule == "ema" else None
        metrics = self.trainer.train_round_kto(examples, ref, seed=self.recipe.seed * 31 + k,
                                               tag=f"round_{k}", beta=beta, on_step=on_step)
        self._save_checkpoints(k, ema=on_step is not None)
        source = "forward" if len(forward) == len(examples) else "sampler" if not forward else "mixed"
        return {**metrics, "beta": beta, "reference_seconds": ref_seconds, "reference_logps_from": source,
                "reference_cache_hits": self.reference_cache_hits - hits}

    def _save_checkpoints(self, k: int, ema: bool) -> None:
        # The policy's whole weights, gathered on every process when sharded.
        policy_state = None if self.models.lora else self.models.unwrapped_policy_state(self.trainer.policy)

        def save(model, state=None):
            def fill(tmp: Path) -> None:
                if self.models.lora is None:
                    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                else:  # merged weights for everything downstream, the adapter for resume
                    model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model),
                                                           safe_serialization=True)
                    save_adapter(model, tmp)
                self.models.tokenizer.save_pretrained(tmp)
            return fill

        if ema:
            if self.main:
                write_dir_atomic(self.round_dir(k) / "reference_checkpoint", save(self.models.reference))
            self.reference_round = EMA
        if self.main:
            # Whole weights are written through pi_0, an unsharded model of the same class and config:
            # a sharded policy's own save_pretrained would start collectives on process 0 alone.
            vessel = self.models.accelerator.unwrap_model(self.trainer.policy) if self.models.lora else self.models.pi0
            write_dir_atomic(self.round_dir(k) / "checkpoint", save(vessel, policy_state))
        self.policy_round = k

    def _ema_hook(self, k: int):
        cfg = self.recipe.reference
        before = sum(read_json(self.round_dir(j) / "train.json").get("optimizer_steps", 0) for j in range(1, k))
        policy = self.models.accelerator.unwrap_model(self.trainer.policy)

        def on_step(step: int) -> None:
            if (before + step) % cfg.every == 0:
                soft_update(self.models.reference, policy, cfg.alpha)
        return on_step

    def sync(self, k: int) -> dict:
        if self.policy_round != k:
            return {"skipped": "policy unchanged this round"}
        result = sync_and_verify(self.models, self.generator, probe_tolerance(self.recipe), self.trainer.policy)
        self.engine_round = k
        return result

    def _eval_settings(self, seed_offset: int) -> SamplingSettings:
        # Temperature 1, top_p 1: true policy samples, so the KL estimates are valid.
        return SamplingSettings(self.recipe.eval.samples_per_prompt, 1.0, 1.0,
                                self.recipe.generation.max_tokens, seed=self.recipe.seed * 100_003 + seed_offset)

    def sample_pi0_eval(self) -> None:
        """pi_0's held-out samples, judged against every later round's (round_0/)."""
        verify_engine(self.models, self.generator, probe_tolerance(self.recipe), self.models.pi0)
        records, stats = sample_records(self.models, self.generator, self.eval_rows, self._eval_settings(50_000))
        write_jsonl(self.round_dir(0) / "pi0_eval_samples.jsonl", records)
        write_json(self.round_dir(0) / "pi0_eval.json",
                   {**stats, **sample_summary(records, self.eval_scorer)})

    @torch.no_grad()
    def evaluate(self, k: int) -> dict:
        """Held-out prompts: eval-judge score, length, EOS rate, KL to the round's reference (before
        any swap) and to pi_0, win rate against pi_0's samples, and adaptive beta's next value."""
        every = self.recipe.eval.every
        if k != self.recipe.rounds and (every == 0 or k % every):
            return {"skipped": f"eval.every={every}"}
        records, stats = self._sample(self.eval_rows, self._eval_settings(50_000))
        write_jsonl(self.round_dir(k) / "eval_samples.jsonl", records)
        m = self.models
        kl_ref = kl_estimate(records, m.reference, m.pad_id, m.device, m.padding_free)
        kl_pi0 = kl_ref if self.reference_round == 0 else kl_estimate(records, m.pi0, m.pad_id, m.device,
                                                                      m.padding_free)
        summary = sample_summary(records, self.eval_scorer)
        result = {"eval_judge_score": summary["judge_score"], "eval_mean_length": summary["mean_length"],
                  "eval_eos_rate": summary["eos_rate"], "kl_to_reference": kl_ref, "kl_to_pi0": kl_pi0,
                  "eval_generation_seconds": stats["generation_seconds"]}
        if self.recipe.eval.win_rate_vs_pi0:
            pi0 = read_jsonl(self.round_dir(0) / "pi0_eval_samples.jsonl")
            wins = win_rate(self.eval_judge, records, pi0)
            result.update(win_rate_vs_pi0=wins["win_rate"], win_tie_rate_vs_pi0=wins["tie_rate"],
                          win_failed_vs_pi0=wins["failed"])
        loss = self.recipe.loss
        if loss.target_kl is not None:
            result["beta_next"] = next_beta(self.current_beta(k), kl_ref, loss.target_kl, loss.beta_adapt_rate)
        return result

    def update_reference(self, k: int) -> dict:
        ref = self.recipe.reference
        if ref.schedule == "swap" and k % ref.every == 0 and self.policy_round == k:
            self.models.set_reference(self.trainer.policy)
            self.reference_round = k
        return {"source_round": self.reference_round, "schedule": ref.schedule}

    def prune_checkpoints(self, k: int) -> None:
        """keep_checkpoints: drop old policy checkpoints, never the latest N or the reference's."""
        keep = self.recipe.keep_checkpoints
        if keep is None:
            return
        for name in ("checkpoint", "reference_checkpoint"):
            existing = [j for j in range(1, k + 1) if (self.round_dir(j) / name).exists()]
            for j in existing[:-keep]:
                if not (name == "checkpoint" and j == self.reference_round):
                    shutil.rmtree(self.round_dir(j) / name)


def run_recipe(recipe: Recipe) -> list[dict]:
    return Run(recipe).execute()
