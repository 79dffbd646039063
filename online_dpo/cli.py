"""`online-dpo run RECIPE.yaml key=value ...`: start or resume a run."""

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


def main(argv: list[str] | None = None) -> int:
    _set_runtime_env()
    parser = argparse.ArgumentParser(prog="online-dpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start or resume a multi-round online DPO run")
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-5")
    args = parser.parse_args(argv)

    from judges.loading import JudgeLoadError
    from online_dpo.config import RecipeError, load_recipe
    from online_dpo.data import DatasetError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from online_dpo.run import run_recipe

        run_recipe(recipe)
    except (RecipeError, DatasetError, JudgeLoadError, FileNotFoundError) as e:
        print(f"online-dpo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
