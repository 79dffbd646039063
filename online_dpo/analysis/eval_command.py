"""`online-dpo eval RUN_DIR`: evaluate a run's policy on held-out prompts, on demand.

Reports the win rate against pi_0 and against any other checkpoint (e.g. an offline run's),
judged in both orders with ties reported, plus mean judge score, KL to pi_0, length and EOS rate.
One sampling engine serves every model: each one's weights are synced in place and verified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from judges.loading import build_judge_stack
from online_dpo.analysis.held_out import kl_estimate, sample_records, sample_summary, win_rate
from online_dpo.analysis.round_uncertainty import eval_score_groups, outcome_values
from online_dpo.analysis.statistics import min_detectable_difference, paired_bootstrap_diff
from online_dpo.config.recipe import JudgeConfig, recipe_from_dict
from online_dpo.data.prompts import run_prompts, sampling_prompts
from online_dpo.sampling.generator import SamplingSettings
from online_dpo.sampling.weight_sync import build_generator, probe_tolerance, sync_and_verify
from online_dpo.storage.artifacts import write_json
from online_dpo.training.logprobs import score_sequences
from online_dpo.training.models import Models


def latest_checkpoint(run_dir: Path) -> Path:
    rounds = sorted((p for p in run_dir.glob("round_*/checkpoint") if p.is_dir()),
                    key=lambda p: int(p.parent.name.split("_")[1]))
    if not rounds:
        raise FileNotFoundError(f"{run_dir}: no round_<k>/checkpoint to evaluate")
    return rounds[-1]


def resolve_model(spec: str, run_dir: Path) -> Path | None:
    """"pi0" -> None (the run's starting model); a run directory -> its latest checkpoint."""
    if spec == "pi0":
        return None
    path = Path(spec)
    if (path / "recipe.yaml").exists():
        return latest_checkpoint(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{spec}: neither 'pi0', a run directory, nor a checkpoint folder")
    return path


def evaluate(run_dir: Path, checkpoint: Path | None, against: list[str], judge: JudgeConfig | None,
             prompts: str | None, samples: int, seed: int = 0) -> dict:
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "recipe.yaml").read_text()))
    judge_cfg = judge or recipe.eval.judge or recipe.judge
    eval_judge, scorer = build_judge_stack(judge_cfg, run_dir / "eval" / "judge_cache.jsonl")
    # The run's own held-out prompts: the same length filter, then the same split.
    rows = sampling_prompts(recipe, prompts)[0] if prompts else run_prompts(recipe).eval
    policy_path = checkpoint or latest_checkpoint(run_dir)
    baselines = {spec: resolve_model(spec, run_dir) for spec in against}

    # Checkpoints hold merged weights, so evaluation needs no adapter even for a LoRA run.
    models = Models(recipe.model_copy(update={"train": recipe.train.model_copy(update={"lora": None})}))
    generator = build_generator(recipe, models.model_dir, models.eos_ids, models.pad_id)
    settings = SamplingSettings(samples, 1.0, 1.0, recipe.generation.max_tokens, seed=seed)
    try:
        records = {}
        for name, path in [("policy", policy_path), *baselines.items()]:
            models.policy.load_state_dict(models.load(path or models.model_dir).state_dict(), strict=True)
            sync_and_verify(models, generator, probe_tolerance(recipe))
            records[name] = sample_records(models, generator, rows, settings)[0]
    finally:
        generator.close()
    result = {"run": str(run_dir), "checkpoint": str(policy_path), "judge": judge_cfg.target,
              "prompts": len(rows), "samples_per_prompt": samples,
              "kl_to_pi0": kl_to_pi0(models, records["policy"]),
              "policy": sample_summary(records["policy"], scorer), "against": {}}
    for name in baselines:
        wins = win_rate(eval_judge, records["policy"], records[name])
        result["against"][name] = {**wins, **sample_summary(records[name], scorer),
                                   **paired_score_difference(records["policy"], records[name], wins)}
    return result


def kl_to_pi0(models, records: list[dict]) -> float:
    with models.frozen() as pi0:
        return kl_estimate(records, lambda sequences: score_sequences(
            pi0, sequences, models.pad_id, models.device, padding_free=models.padding_free))


def paired_score_difference(policy: list[dict], baseline: list[dict], wins: dict) -> dict:
    """The policy's mean eval score minus the baseline's on the same prompts, a paired bootstrap
    interval, and the smallest differences this many prompts can detect (alpha 0.05, power 0.8)."""
    a, b = eval_score_groups(policy), eval_score_groups(baseline)
    diff = paired_bootstrap_diff(a, b) if a is not None and b is not None else None
    per_prompt_wins = [outcome_values(counts) for counts in wins["per_prompt"]]
    return {"score_diff": diff.value if diff else None, "score_diff_ci": diff.ci if diff else None,
            "score_diff_mde": min_detectable_difference(a, b) if diff else None,
            # how far from 0.5 a win rate must be to be told from a tie at this n
            "win_rate_mde": min_detectable_difference([[v - 0.5 for v in g] for g in per_prompt_wins])}


def to_markdown(result: dict) -> str:
    """Every win rate and mean score with its 95% interval: `0.412 [0.33, 0.49]`."""
    def fmt(v, ci=None):
        if v is None:
            return "-"
        text = f"{v:.3f}" if isinstance(v, float) else str(v)
        return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    policy = result["policy"]
    lines = [f"policy {result['checkpoint']}: judge score {fmt(policy['judge_score'], policy.get('judge_score_ci'))}, "
             f"KL to π0 {fmt(result['kl_to_pi0'])}, length {fmt(policy['mean_length'])}, "
             f"EOS {fmt(policy['eos_rate'])} ({result['prompts']} prompts)", "",
             "| against | win rate | wins | losses | ties | failed | flip rate | their score | score diff "
             "| MDE score | MDE win | their length |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["against"].items():
        lines.append(f"| {name} | {fmt(r['win_rate'], r.get('win_rate_ci'))} | {r['wins']} | {r['losses']} | "
                     f"{r['ties']} | {r['failed']} | {fmt(r['position_flip_rate'])} | "
                     f"{fmt(r['judge_score'], r.get('judge_score_ci'))} | {fmt(r.get('score_diff'), r.get('score_diff_ci'))} | "
                     f"{fmt(r.get('score_diff_mde'))} | {fmt(r.get('win_rate_mde'))} | {fmt(r['mean_length'])} |")
    lines += ["", "Intervals are 95%: Wilson for win rates (ties count half), a bootstrap over prompts for "
              "scores, paired on the shared prompts for score diff. MDE: the smallest difference this many "
              "prompts detects (alpha 0.05, power 0.8); for win rate, the distance from 0.5."]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (runs/<name>)")
    parser.add_argument("--checkpoint", help="policy checkpoint folder (default: the run's latest)")
    parser.add_argument("--against", action="append",
                        help="baseline: 'pi0', a run directory, or a checkpoint folder (repeatable; default pi0)")
    parser.add_argument("--judge", help="eval judge as module:Class (default: the recipe's eval judge)")
    parser.add_argument("--judge-kwargs", default="{}", help="JSON keyword arguments for --judge")
    parser.add_argument("--prompts", help="prompt file (default: the run's held-out prompts)")
    parser.add_argument("--samples", type=int, default=2, help="samples per prompt (temperature 1)")


def main(args) -> int:
    run_dir = Path(args.run)
    if not (run_dir / "recipe.yaml").exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no recipe.yaml)")
    judge = JudgeConfig(target=args.judge, kwargs=json.loads(args.judge_kwargs)) if args.judge else None
    result = evaluate(run_dir, Path(args.checkpoint) if args.checkpoint else None,
                      args.against or ["pi0"], judge, args.prompts, args.samples)
    name = Path(result["checkpoint"]).parent.name
    write_json(run_dir / "eval" / f"{name}.json", result)
    print(to_markdown(result))
    print(f"[online-dpo] wrote {run_dir / 'eval' / f'{name}.json'}")
    return 0
