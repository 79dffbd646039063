"""Three probes behind the LoRA rows of memory_bench.py (benchmarks/README.md), random-init models.

- `saved`: bytes autograd keeps for one backward at SmolLM2's shape (all-linear rank-16 LoRA,
  unique storages): float32 base, bf16 base through PEFT's own input cast, bf16 base through
  `add_adapter` (InputKeepingLinear); without autocast and under CPU bf16 autocast (CUDA's path).
- `step`: a float32 full-fine-tuning step at SmolLM2's shape (1 thread, 2 x 128 tokens, AdamW)
  under glibc's default malloc and under fixed mmap thresholds (MALLOC_MMAP_THRESHOLD_, which has
  to be set before the process starts: one process per setting, alternating).
- `root`: 2 gloo processes, Qwen2.5-0.5B's shape, FSDP2 over the decoder layers and the root:
  RSS above the sharded model in the first no-grad forward, against the tied embedding's size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
QWEN = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
THRESHOLDS = ("default", "131072", "1048576")


def saved_mib(variant: str, tokens: int, autocast: bool) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from online_dpo.config.recipe import AdapterConfig
    from online_dpo.training.lora import add_adapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(torch.float32 if variant == "fp32" else torch.bfloat16)
    if variant == "bf16-ours":
        model = add_adapter(model, AdapterConfig(rank=16))
    else:
        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    storages: dict[int, int] = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, SMOLLM2["vocab_size"], (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss.backward()
    return sum(storages.values()) / 2**20


def probe_saved(args) -> None:
    print("| base | autocast | tokens | saved for backward (MiB) |\n|---|---|---:|---:|")
    for autocast, tokens in ((False, args.tokens), (True, args.autocast_tokens)):
        for variant in (("fp32", "bf16-peft", "bf16-ours") if not autocast else ("bf16-peft", "bf16-ours")):
            print(f"| {variant} | {'cpu bf16' if autocast else 'none'} | {tokens} | "
                  f"{saved_mib(variant, tokens, autocast):.1f} |", flush=True)


def step_worker() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (2, 128))
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        model.model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    print(statistics.median(times[1:]))  # the first step allocates Adam's moments


def probe_step(args) -> None:
    seconds: dict[str, list[float]] = {t: [] for t in THRESHOLDS}
    for _ in range(args.repeats):
        for threshold in THRESHOLDS:  # alternating, so a drift in the machine hits every setting
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            if threshold != "default":
                env["MALLOC_MMAP_THRESHOLD_"] = threshold
            out = subprocess.run([sys.executable, __file__, "worker-step"], env=env, capture_output=True,
                                 text=True, check=True, timeout=900)
            seconds[threshold].append(float(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(seconds["default"])
    print("| MALLOC_MMAP_THRESHOLD_ | seconds per step (each repeat) | median | × default |\n|---|---|---:|---:|")
    for threshold, runs in seconds.items():
        print(f"| {threshold} | {', '.join(f'{s:.2f}' for s in runs)} | {statistics.median(runs):.2f} | "
              f"{statistics.median(runs) / base:.2f}× |")


def root_worker() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from online_dpo.training.memory import release_memory

    def rss_gib(field: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 2**20

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN)).requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    release_memory()
    sharded = rss_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    with torch.no_grad():
        model(input_ids=torch.randint(0, QWEN["vocab_size"], (4, 36)), logits_to_keep=1)
    embedding = QWEN["vocab_size"] * QWEN["hidden_size"] * 4 / 2**30
    print(f"| {dist.get_rank()} | {sharded:.2f} | +{rss_gib('VmHWM') - sharded:.2f} | {embedding:.2f} |", flush=True)
    dist.destroy_process_group()


def probe_root(args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          __file__, "worker-root"], env=env, capture_output=True, text=True, check=True, timeout=900)
    print("| process | sharded RSS GiB | first no-grad forward's peak above it | whole embedding GiB (float32) |")
    print("|---:|---:|---:|---:|")
    print("\n".join(sorted(line for line in out.stdout.splitlines() if line.startswith("| "))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=("saved", "step", "root", "all", "worker-step", "worker-root"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--autocast-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.probe == "worker-step":
        return step_worker()
    if args.probe == "worker-root":
        return root_worker()
    for name, probe in (("saved", probe_saved), ("step", probe_step), ("root", probe_root)):
        if args.probe in (name, "all"):
            probe(args)
            print()


if __name__ == "__main__":
    main()
