"""A run: rounds of sample -> judge -> pairs -> train -> sync -> eval -> reference.

    online-dpo run RECIPE.yaml [key=value ...]

What a round is. Each step is `step(k) -> summary` (online_dpo/pipeline/steps.py). It writes its artifacts
atomically under runs/<name>/round_<k>/ and finishes by writing `<step>.json`. Which steps a round
has depends on where its training data comes from (online_dpo/pipeline/pair_sources.py):
- online / fully_online: sample, judge, pairs, train, sync, eval, reference;
- offline: pairs, train, sync, eval, reference (the pairs come from a fixed dataset, or from
  round_0/, where pi_0's samples for every round are drawn and judged once).
Everything that varies with the recipe is chosen once, when the run is built: the objective
(DPO-family or KTO), the pair source, the reference schedule (fixed, swap, EMA, LoRA's adapter-off
base), LoRA or whole-weight checkpoints, constant or adaptive beta. No step asks for the mode.

How resume works. A step whose `<step>.json` exists is done and is never redone, so running the
same recipe again continues at the first missing artifact and gives the same result: every seed
is derived from the recipe's seed and the round. On start the policy is restored from the newest
checkpoint, the reference by its schedule, and the restored policy is synced into the fresh
sampler and verified before anything samples. The resolved recipe is written first, and a resume
under a changed recipe is refused (more `rounds` and other `report_to` trackers are allowed).

Processes. Under `accelerate launch`, process 0 samples, judges and writes every artifact. Every
process joins the steps that change or read its models (`every_process` below); at the others it
waits for process 0, or, with an engine on every process (generation.engines: every_process),
samples its share of process 0's prompts (online_dpo/sampling/samplers.py). Whether a step or round is
done is process 0's decision, broadcast; each process restores its own models from the
checkpoints (a shared filesystem is assumed).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from judges.loading import build_judge, build_judge_stack
from judges.protocol import innermost, judge_hook
from online_dpo.analysis.round_report import finish_run, round_line, round_metrics
from online_dpo.analysis.round_uncertainty import alarm_message
from online_dpo.analysis.trackers import build_tracking
from online_dpo.config.compat import prompt_token_limit
from online_dpo.config.recipe import Recipe, RecipeError, recipe_from_dict, recipe_to_dict
from online_dpo.data.prompts import run_prompts
from online_dpo.faults import maybe_kill
from online_dpo.pipeline.beta_schedules import build_beta
from online_dpo.pipeline.checkpoints import build_checkpoints
from online_dpo.pipeline.draw_ahead import StaleSchedule, build_draws
from online_dpo.pipeline.objectives import build_objective
from online_dpo.pipeline.pair_sources import build_pair_source
from online_dpo.pipeline.reference_schedules import build_reference
from online_dpo.pipeline.steps import JudgeFailureError, ReferenceMismatchError, RoundSteps
from online_dpo.sampling.samplers import build_sampler
from online_dpo.storage.artifacts import RunDir, write_json, write_text_atomic
from online_dpo.storage.ref_cache import ReferenceLogpCache, model_fingerprint
from online_dpo.training.distributed import Processes, is_sharded
from online_dpo.training.lr_schedule import RunSchedule
from online_dpo.training.models import Models
from online_dpo.training.trainer import DPOTrainer

__all__ = ["Run", "run_recipe", "JudgeFailureError", "ReferenceMismatchError"]


@dataclass(frozen=True)
class Step:
    name: str  # its artifact is round_<k>/<name>.json
    method: str  # the RoundSteps method that runs it
    every_process: bool  # it changes every process's models, or reads the policy whole (a gather)


STEPS = {step.name: step for step in (
    Step("sample", "sample", False), Step("judge", "judge", False), Step("pairs", "pairs", False),
    Step("train", "train", True), Step("sync", "sync", True), Step("eval", "evaluate", False),
    Step("reference", "update_reference", True))}
TRAINING = ("train", "sync", "eval", "reference")
# After this step of round v the sampler holds the policy as round v left it (round v's, or the
# one before when round v trained nothing) and has sampled the held-out prompts with it: it draws
# the rounds that "the policy of round v" samples ahead (generation.max_staleness).
DRAW_AHEAD_AFTER = "eval"


class Run:
    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.run_dir = RunDir(recipe.run_dir, recipe.rounds)
        self.dir = self.run_dir.path
        self.procs = Processes()
        self.main = self.procs.main
        self.drawn: set[int] = set()  # the rounds v whose policy's draws ahead have started

    # ------------------------------------------------------------------ the run

    def execute(self) -> list[dict]:
        recipe, procs = self.recipe, self.procs
        # Cheap checks first: a bad judge or dataset fails before any model loads.
        prompts = run_prompts(recipe)
        train_rows, eval_rows = prompts.train, prompts.eval
        judges = self.build_judges(train_rows, eval_rows) if self.main else (None, None, None)
        objective = build_objective(recipe.loss)
        if recipe.mode == "offline" and recipe.data.pairs is not None:
            objective.check_dataset(recipe.data.pairs)
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            check_resolved_recipe(recipe, self.dir)
            if not (self.dir / "prompts.json").exists():  # the recipe cannot change on resume
                write_json(self.dir / "prompts.json", prompts.counts)
            for kind, why in (("dropped_long_prompts", f"longer than {prompt_token_limit(recipe)} tokens "
                                                       "dropped (data.max_prompt_tokens)"),
                              ("duplicate_prompts", "exact duplicates dropped")):
                if prompts.counts[kind]:
                    print(f"[online-dpo] {prompts.counts[kind]} prompts {why}", flush=True)
        procs.barrier()
        if procs.agree(self.finished()):
            if self.main:  # a run killed after its last metrics.json, before a tracker logged it
                tracking = build_tracking(recipe, self.run_dir, writer=True)
                tracking.log_round(recipe.rounds)
                tracking.close()
            return finish_run(self.dir, recipe.rounds) if self.main else []

        torch.manual_seed(recipe.seed)
        self.steps = self.build(judges, objective, train_rows, eval_rows)
        source = self.steps.source
        try:
            # pi_0 work first, while the fresh engine still holds pi_0's weights.
            if recipe.eval.win_rate_vs_pi0 and not procs.agree(self.run_dir.done(0, "pi0_eval")):
                self.procs.serve(self.steps.sample_pi0_eval)
            self.resume()
            for name in source.setup_steps:  # offline from pi_0: collect every round's pairs once
                self.run_step(0, STEPS[name])
            # The sampler holds the last trained policy (synced by resume()). It is also the policy
            # of every later round whose eval is done (those rounds trained nothing), and it draws
            # what their draws left undrawn. A policy whose eval is not done draws after it.
            held = self.steps.policy_round
            evaluated = procs.agree(max((v for v in range(1, recipe.rounds + 1)
                                         if self.run_dir.done(v, DRAW_AHEAD_AFTER)), default=0))
            if held <= evaluated:
                self.draw_ahead(range(held, evaluated + 1))
            for k in range(1, recipe.rounds + 1):
                if not procs.agree(self.run_dir.done(k, "metrics")):
                    self.run_round(k, [STEPS[name] for name in (*source.round_steps, *TRAINING)])
        finally:  # each closes even if the one before fails: a launched vLLM server must stop
            try:
                self.steps.draws.close()  # no draw ahead starts after a failure, or past the run
                self.tracking.close()
            finally:
                try:
                    self.steps.sampler.close()
                finally:
                    bases = {id(b): b for b in (innermost(j) for j in judges if j is not None)}
                    for base in bases.values():  # each judge once: the stacks may share one
                        if callable(getattr(base, "close", None)):
                            base.close()  # an HTTP judge's pooled connections, a local judge's engine
        procs.barrier()
        return finish_run(self.dir, recipe.rounds) if self.main else []

    def round_dir(self, k: int) -> Path:
        return self.run_dir.round(k)

    @property
    def models(self):
        return self.steps.models

    @property
    def trainer(self):
        return self.steps.trainer

    def finished(self) -> bool:
        return all(self.run_dir.done(k, "metrics") for k in range(1, self.recipe.rounds + 1))

    def build_judges(self, train_rows: list[dict], eval_rows: list[dict]):
        """(training judge, win-rate judge, eval scorer). Unset, the eval judge is the training
        judge, and the win-rate judge the eval judge. A judge with `check_rows` sees the prompts it
        will judge now, before any model loads (a missing column, an argument it lacks)."""
        recipe, cache = self.recipe, self.dir
        train_base = build_judge(recipe.judge.target, recipe.judge.kwargs)
        train_judge, _ = build_judge_stack(recipe.judge, cache / "judge_cache.jsonl", base=train_base)
        # Unset eval.judge: the training judge's own instance (a reward model is loaded once), behind
        # its own cache and layers.
        eval_cfg = recipe.eval.judge or recipe.judge
        eval_base = build_judge(eval_cfg.target, eval_cfg.kwargs) if recipe.eval.judge else train_base
        eval_judge, eval_scorer = build_judge_stack(eval_cfg, cache / "eval_judge_cache.jsonl", base=eval_base)
        if recipe.eval.win_rate_judge is not None:  # the eval stack's scorer stays, over the same base
            eval_judge, _ = build_judge_stack(recipe.eval.win_rate_judge, cache / "win_rate_judge_cache.jsonl")
        for judge, rows in ((train_base, train_rows), (eval_base, eval_rows), (eval_judge, eval_rows)):
            if (check := judge_hook(judge, "check_rows")) is not None:
                try:
                    check(rows)
                except (KeyError, ValueError) as bad:
                    raise RecipeError(f"judge {type(check.__self__).__name__}: {bad}") from None
        return train_judge, eval_judge, eval_scorer

    def build(self, judges, objective, train_rows, eval_rows) -> RoundSteps:
        """Every strategy the recipe selects, chosen here once."""
        recipe = self.recipe
        models = Models(recipe)
        checkpoints = build_checkpoints(self.run_dir, models, writer=self.main)
        # A resumed policy loads before the trainer wraps it (and, under FSDP2 or ZeRO-3, shards it).
        policy_round = checkpoints.restore_policy(models.policy)
        train = recipe.train
        trainer = DPOTrainer(models.policy, recipe.loss, train, models.pad_id, models.accelerator,
                             RunSchedule(train.lr_scheduler, train.warmup_ratio, recipe.rounds, train.learning_rate))
        if train.carry_optimizer_state and policy_round:
            trainer.load_optimizer_state(checkpoints.optimizer_state(policy_round))
        # The engines: process 0's alone, or one per process (generation.engines).
        sampler = build_sampler(recipe, models, self.procs, self.dir)
        try:
            # pi_0 log-probs are cached across runs by process 0 alone; not when the reference may be
            # the sharded policy, whose forward every process must join (a hit skips it).
            pi0_cache = None
            if self.main and recipe.reference.cache_logps and not is_sharded(models.accelerator):
                pi0_cache = ReferenceLogpCache(model_fingerprint(
                    models.model_dir, dtype=next(models.policy.parameters()).dtype, device=models.device.type,
                    padding_free=models.padding_free))
            self.tracking = build_tracking(recipe, self.run_dir, writer=self.main)  # opens lazily
            return RoundSteps(
                recipe, self.run_dir, self.procs, models=models, trainer=trainer, sampler=sampler, judges=judges,
                objective=objective, source=build_pair_source(recipe, objective, self.run_dir, models),
                reference=build_reference(recipe, models, self.run_dir, checkpoints), checkpoints=checkpoints,
                beta=build_beta(recipe.loss, self.run_dir), pi0_cache=pi0_cache,
                train_rows=train_rows, eval_rows=eval_rows, policy_round=policy_round,
                schedule=StaleSchedule(recipe.generation.max_staleness, recipe.rounds),
                draws=build_draws(recipe, self.procs))
        except BaseException:  # the engine (or a launched vLLM server) must not outlive a failed build
            sampler.close()
            raise

    def resume(self) -> None:
        """After the policy (restored in `build`): the reference, then the sampler's weights."""
        steps = self.steps
        steps.reference.restore()
        if steps.policy_round:  # the fresh engine holds pi_0; every process joins the gather
            steps.sync_policy()

    # ------------------------------------------------------------------ one round

    def run_round(self, k: int, pipeline: list[Step]) -> None:
        self.steps.draws.wait(k)  # this round's samples and judgments, if they are being drawn ahead
        for step in pipeline:
            self.run_step(k, step)
            if step.name == DRAW_AHEAD_AFTER:
                self.draw_ahead([k])
        if not self.main:
            return
        metrics = round_metrics(self.run_dir.round(k), k, self.dir)
        write_json(self.run_dir.round(k) / "metrics.json", metrics)
        self.tracking.log_round(k)  # with any earlier round a killed run left unlogged
        self.steps.checkpoints.prune(k, self.recipe.keep_checkpoints, self.steps.reference.protected_checkpoint())
        print(round_line(k, metrics), flush=True)  # held-out score and win rate with 95% intervals
        if metrics.get("gaming_alarm"):
            print(f"[online-dpo] {alarm_message(metrics['gaming_alarm'])}", flush=True)

    def draw_ahead(self, after: Iterable[int]) -> None:
        """The rounds that the policy of each round v in `after` samples ahead of their turn (the
        sampler holds it): their sample and judge steps, now or in the background
        (online_dpo/pipeline/draw_ahead.py). Each round's policy draws once."""
        after = [v for v in after if v not in self.drawn]
        self.drawn.update(after)
        rounds = [j for v in after for j in self.steps.schedule.drawn_by(v)
                  if not self.procs.agree(self.run_dir.done(j, "judge"))]
        self.steps.draws.start(rounds, self.draw)

    def draw(self, k: int) -> None:
        for name in ("sample", "judge"):
            self.run_step(k, STEPS[name])

    def run_step(self, k: int, step: Step) -> None:
        if self.procs.agree(self.run_dir.done(k, step.name)):
            return
        if step.every_process:
            self.timed_step(k, step)
        else:  # process 0's step; the others serve what it asks (their share of sampling, a sharded forward)
            self.procs.serve(lambda: self.timed_step(k, step))
        self.procs.barrier()  # the others wait for process 0's artifacts
        maybe_kill(f"round_{k}/{step.name}")

    def timed_step(self, k: int, step: Step) -> None:
        t0, started = time.perf_counter(), time.time()
        summary = getattr(self.steps, step.method)(k)
        # started_at (epoch seconds): when the step ran beside another (a draw ahead) shows on disk.
        summary.update(seconds=time.perf_counter() - t0, started_at=started)
        if self.main:
            write_json(self.run_dir.round(k) / f"{step.name}.json", summary)


def run_recipe(recipe: Recipe) -> list[dict]:
    return Run(recipe).execute()


# ---------------------------------------------------------------------------- the recipe on disk


def check_resolved_recipe(recipe: Recipe, run_dir: Path) -> None:
    """Write the resolved recipe first; refuse to resume a run under a different recipe."""
    path = run_dir / "recipe.yaml"
    resolved = recipe_to_dict(recipe)
    if path.exists():
        previous = recipe_to_dict(recipe_from_dict(yaml.safe_load(path.read_text())))
        # More rounds extends a run without invalidating finished work; trackers change no result.
        # Not so offline from pi_0: round_0/ drew the pool for the first `rounds` only.
        allowed = ("report_to",) if recipe.mode == "offline" and recipe.data.pairs is None else ("rounds", "report_to")
        diff = _diff_keys(previous, resolved)
        changed = [k for k in sorted(diff) if k not in allowed]
        if "rounds" in diff and recipe.generation.max_staleness:
            raise RecipeError(f"{run_dir}: more rounds under generation.max_staleness "
                              f"{recipe.generation.max_staleness}: the new rounds are sampled by policies of "
                              f"rounds already past, which the sampler no longer holds; use a new name= "
                              f"to start a new run")
        if "rounds" in diff and schedule_spans_rounds(recipe.train):
            raise RecipeError(f"{run_dir}: more rounds would change the learning rate of the rounds already "
                              f"run (train.lr_scheduler {recipe.train.lr_scheduler}, warmup_ratio "
                              f"{recipe.train.warmup_ratio} span the run); use a new name= to start a new run")
        if changed:
            raise RecipeError(f"{run_dir} was started with a different recipe (changed: {', '.join(changed)}); "
                              "use a new name= to start a new run")
    write_text_atomic(path, yaml.safe_dump(resolved, sort_keys=False))


def schedule_spans_rounds(train) -> bool:
    return train.lr_scheduler != "constant" or train.warmup_ratio > 0


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
