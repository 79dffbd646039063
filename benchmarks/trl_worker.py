"""One TRL OnlineDPOTrainer run for benchmarks/vs_trl.py. Runs inside .venv-trl.

TRL 1.16 `trl.experimental.online_dpo.OnlineDPOTrainer` on CPU, fp32, no vLLM: each training
step samples 2 completions per prompt with transformers `generate` from the current policy,
scores both with the reward function, makes one pair per prompt (the higher reward is chosen;
a tie goes to the *first* sample, `first >= second` in TRL), runs the policy and the frozen
reference (pi_0) forward, and takes a DPO step.

The reward function is our quickstart judge's scoring, `judges.rules.ConciseAnswerJudge.score`,
imported from this repository (judges/rules.py needs only `re`).

Prints one JSON line (the last line of stdout) with pairs, seconds, pairs_per_hour and details.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from workload import add_workload_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF model folder (the converted SmolLM2)")
    p.add_argument("--prompts", default=str(REPO / "recipes" / "data" / "prompts.jsonl"))
    add_workload_args(p)
    p.add_argument("--max-words", type=int, default=60)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="TRL's own default (OnlineDPOConfig turns it on); off by default here to "
                        "match our loop. On, TRL's generate runs with use_cache=False (no KV cache)")
    return p.parse_args(argv)


def load_prompts(path: str, n: int) -> list[list[dict]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if n > len(rows):
        raise SystemExit(f"--pairs {n} exceeds the {len(rows)} prompts in {path}")
    out = []
    for row in rows[:n]:
        prompt = row["prompt"]
        out.append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    per_step = args.micro_batch * args.grad_accum
    if args.pairs % per_step:
        raise SystemExit(f"--pairs ({args.pairs}) must be a multiple of micro-batch x grad-accum "
                         f"({per_step}) so both loops take the same optimizer steps")

    sys.path.insert(0, str(REPO))
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from judges.rules import ConciseAnswerJudge

    judge = ConciseAnswerJudge(max_words=args.max_words)
    stats = {"scores": [], "ties": 0, "compared": 0, "completion_tokens": [], "eos": 0}

    def concise_answer(prompts, completions, completion_ids, **kwargs):
        """Our ConciseAnswerJudge's score as a TRL reward function (conversational format)."""
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [judge.score({"prompt": p}, t) for p, t in zip(prompts, texts, strict=True)]
        half = len(rewards) // 2  # TRL passes [first samples..., second samples...]
        stats["ties"] += sum(a == b for a, b in zip(rewards[:half], rewards[half:], strict=True))
        stats["compared"] += half
        stats["scores"].extend(rewards)
        for ids in completion_ids:
            end = next((i for i, t in enumerate(ids) if t in eos_ids), None)
            stats["completion_tokens"].append(len(ids) if end is None else end + 1)
            stats["eos"] += end is not None
        return rewards

    step_seconds: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_seconds.append(time.perf_counter() - self._t)

    torch.manual_seed(args.seed)
    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    eos_ids = {tokenizer.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    eos_ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    dataset = Dataset.from_dict({"prompt": load_prompts(args.prompts, args.pairs)})

    out_dir = tempfile.mkdtemp(prefix="vs_trl_trl_")
    config = OnlineDPOConfig(
        output_dir=out_dir,
        use_cpu=True,                       # CPU: no CUDA here
        bf16=False, fp16=False,             # fp32, as our loop on CPU (TRL's default is bf16)
        # TRL defaults to gradient checkpointing, which also makes its `generate` run without a
        # KV cache (use_cache=False). Ours defaults to off; match it unless asked.
        gradient_checkpointing=args.gradient_checkpointing,
        use_vllm=False,                     # TRL samples with transformers `generate`
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.pairs // per_step,   # one pass over the prompts
        learning_rate=args.lr,
        lr_scheduler_type="constant",       # ours: plain AdamW at a constant lr
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        loss_type="sigmoid",
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=concise_answer,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    load_seconds = time.perf_counter() - t_load

    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    total = time.perf_counter() - T_START

    pairs = trainer.state.global_step * per_step
    n = max(len(stats["completion_tokens"]), 1)
    history = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "side": "trl",
        "pairs": pairs,
        "prompts": pairs,
        "seconds": seconds,
        "pairs_per_hour": pairs / seconds * 3600,
        "total_seconds": total,
        "startup_seconds": total - seconds,
        "load_seconds": load_seconds,
        "step_seconds": step_seconds,
        "ties_given_to_first": stats["ties"],
        "pairs_compared": stats["compared"],
        "mean_judge_score": sum(stats["scores"]) / max(len(stats["scores"]), 1),
        "mean_completion_tokens": sum(stats["completion_tokens"]) / n,
        "eos_rate": stats["eos"] / n,
        "losses": [h["loss"] for h in history],
        "versions": {"trl": trl.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": str(config.optim),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
