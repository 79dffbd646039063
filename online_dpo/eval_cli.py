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
from online_dpo.artifacts import write_json
from online_dpo.config import JudgeConfig, recipe_from_dict
from online_dpo.data import load_prompt_rows, split_prompts
from online_dpo.engine import Models, build_generator, probe_tolerance, sync_and_verify
from online_dpo.evaluation import kl_estimate, sample_records, sample_summary, win_rate
from online_dpo.generation.base import SamplingSettings


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
    rows = (load_prompt_rows(prompts) if prompts
            else split_prompts(load_prompt_rows(recipe.data.prompts), recipe.data.eval_prompts)[1])
    policy_path = checkpoint or latest_checkpoint(run_dir)
    baselines = {spec: resolve_model(spec, run_dir) for spec in against}

    # Checkpoints hold merged weights, so evaluation needs no adapter even for a LoRA run.
    models = Models(recipe.model_copy(update={"train": recipe.train.model_copy(update={"lora": None})}))
    generator = build_generator(recipe, models.model_dir, models.eos_ids, models.pad_id)
    settings = SamplingSettings(samples, 1.0, 1.0, recipe.generation.max_tokens, seed=seed)
    try:
        records = {}
        for name, path in [("policy", policy_path), *baselines.items()]:
            source = models.pi0 if path is None else models.load(path)
            models.policy.load_state_dict(source.state_dict(), strict=True)
            sync_and_verify(models, generator, probe_tolerance(recipe))
            records[name] = sample_records(models, generator, rows, settings)[0]
    finally:
        generator.close()
    result = {"run": str(run_dir), "checkpoint": str(policy_path), "judge": judge_cfg.target,
              "prompts": len(rows), "samples_per_prompt": samples,
              "kl_to_pi0": kl_estimate(records["policy"], models.pi0, models.pad_id, models.device,
                                        models.padding_free),
              "policy": sample_summary(records["policy"], scorer), "against": {}}
    for name in baselines:
        result["against"][name] = {**win_rate(eval_judge, records["policy"], records[name]),
                                   **sample_summary(records[name], scorer)}
    return result


def to_markdown(result: dict) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"policy {result['checkpoint']}: judge score {fmt(result['policy']['judge_score'])}, "
             f"KL to π0 {fmt(result['kl_to_pi0'])}, length {fmt(result['policy']['mean_length'])}, "
             f"EOS {fmt(result['policy']['eos_rate'])}", "",
             "| against | win rate | wins | losses | ties | failed | flip rate | their score | their length |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["against"].items():
        lines.append(f"| {name} | {fmt(r['win_rate'])} | {r['wins']} | {r['losses']} | {r['ties']} | "
                     f"{r['failed']} | {fmt(r['position_flip_rate'])} | {fmt(r['judge_score'])} | "
                     f"{fmt(r['mean_length'])} |")
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
