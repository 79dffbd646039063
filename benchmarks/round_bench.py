"""Per-round cost of the real pipeline: phase seconds, pairs/hour, tokens/s, sync share, RSS, MFU.

    .venv/bin/python benchmarks/round_bench.py                      # 3 rounds of the quickstart
    .venv/bin/python benchmarks/round_bench.py --rounds 2 data.prompts_per_round=8

Runs `online_dpo.pipeline.run.Run(recipe).execute()` (vLLM sampling, the judge, DPO training, in-place
weight sync, evaluation) on a recipe (default `recipes/concise_answers.yaml`) with `name=bench` and
`output_dir` set to a temporary folder, then reads the run's `metrics.jsonl`, each round's
`train.json` and `pairs/` dataset, and prints per-round figures and their medians over rounds 2..N
(round 1 is a warm-up: it includes the first probe of the fresh engine and first-call overheads).

Everything here is a ratio or a rate measured in ONE run on a shared, noisy machine: nothing is
asserted, and numbers from different runs (or a busy machine) are not comparable to the digit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("sample", "judge", "pairs", "train", "sync", "eval", "reference")
RESERVED = ("name", "output_dir", "rounds")
FLOPS_FORMULA = (
    "train FLOPs/round = 6 * (n_params - n_head) * T_train + 6 * n_head * S_train, T_train = "
    "epochs * sum over pairs of [len(prompt) + len(chosen) + len(rejected)] (real tokens, padding "
    "excluded; the pair's two sides share the prompt; 2 * len(prompt) with train.padding_free "
    "false), S_train = epochs * sum of [len(chosen) + len(rejected)] (the LM "
    "head runs only where a completion token is predicted); "
    "reference FLOPs/round = 2 * (n_params - n_head) * T_ref + 2 * n_head * S_ref over the "
    "sequences the reference scored by a forward pass (all of them when "
    "reference_logps_from='forward'; only the one checked pair when 'sampler'); "
    "train FLOP/s = train FLOPs / train_seconds; "
    "train+ref FLOP/s = (train FLOPs + reference FLOPs) / (train_seconds + reference_seconds); "
    "fraction = FLOP/s / fp32 matmul FLOP/s (the best per-size median, measured in this process "
    "before and after the run with the same thread settings)"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="recipe overrides, key=value (e.g. seed=1)")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "concise_answers.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="runs/bench/round_bench.json", help="JSON results file")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    p.add_argument("--threads", type=int, default=None,
                   help="set OMP_NUM_THREADS before torch is imported (default: leave as is)")
    p.add_argument("--matmul-sizes", default="1024,2048", help="square fp32 matmul sizes")
    p.add_argument("--matmul-reps", type=int, default=7)
    args = p.parse_args(argv)
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            p.error(f"override {item!r} is not key=value")
        if key in RESERVED:
            p.error(f"{key} is set by the benchmark (use --rounds for rounds)")
    return args


def matmul_throughput(sizes: list[int], reps: int) -> dict:
    """fp32 torch.matmul FLOP/s (2 n^3 per product), median of `reps` after two warm-up calls."""
    import torch

    out = {"threads": torch.get_num_threads(), "sizes": {}}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            torch.matmul(a, b)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out["sizes"][str(n)] = {"median_seconds": med, "flops_per_second": 2 * n**3 / med,
                                "min_seconds": min(times), "max_seconds": max(times)}
    out["peak_flops_per_second"] = max(v["flops_per_second"] for v in out["sizes"].values())
    return out


def gib_from_kib(kib: float) -> float:
    return kib / 2**20


def current_rss_kib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


class RoundWatcher(threading.Thread):
    """Records the process's peak RSS so far when each round's metrics.json appears."""

    def __init__(self, run_dir: Path, rounds: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.run_dir, self.rounds, self.interval = run_dir, rounds, interval
        self.seen: dict[int, dict] = {}
        self.stop = threading.Event()

    def poll(self) -> None:
        for k in range(1, self.rounds + 1):
            if k not in self.seen and (self.run_dir / f"round_{k}" / "metrics.json").exists():
                self.seen[k] = {"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                "rss_kib": current_rss_kib(), "at": time.perf_counter(),
                                "load_average": os.getloadavg()[0]}

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()


def sequence_tokens(prompt: list, completion: list) -> int:
    return len(prompt) + len(completion)


def round_flops_inputs(run_dir: Path, k: int, epochs: int, shared_prompt: bool) -> dict:
    """Token counts for the FLOP estimate of round k, from its pairs/ dataset and train.json.
    shared_prompt: padding-free batches compute a pair's prompt once."""
    import datasets

    rdir = run_dir / f"round_{k}"
    train = json.loads((rdir / "train.json").read_text())
    if not (rdir / "pairs").exists() or not train.get("train_pairs"):
        return {"train": train, "pairs": 0, "pair_tokens": 0, "train_tokens": 0,
                "reference_tokens": 0, "train_scored": 0, "reference_scored": 0}
    ds = datasets.load_from_disk(str(rdir / "pairs"))
    per_pair = [sequence_tokens(p, c) + sequence_tokens(p, r) - shared_prompt * len(p)
                for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"],
                                   strict=True)]
    scored = [len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"], strict=True)]
    source = train.get("reference_logps_from")
    if source == "forward":
        ref_pairs = list(range(len(per_pair)))
    else:
        # Pairs whose sampler was the reference reuse vLLM's log-probs; the first such pair is
        # checked by one reference forward pass. The reference round in force during round k is
        # the one round k-1's reference step left (0 = pi_0 before round 1).
        ref_round = 0
        prev = run_dir / f"round_{k - 1}" / "reference.json"
        if k > 1 and prev.exists():
            ref_round = json.loads(prev.read_text())["source_round"]
        reuse = [r == ref_round for r in ds["sampler_round"]] if source == "mixed" else \
            [True] * len(per_pair)
        ref_pairs = [i for i, u in enumerate(reuse) if not u]
        if any(reuse):
            ref_pairs.append(reuse.index(True))
    return {"train": train, "pairs": len(per_pair), "pair_tokens": sum(per_pair),
            "train_tokens": epochs * sum(per_pair),
            "reference_tokens": sum(per_pair[i] for i in ref_pairs),
            "train_scored": epochs * sum(scored), "reference_scored": sum(scored[i] for i in ref_pairs),
            "reference_logps_from": source}


def median_or_none(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ".2f", width: int = 8) -> str:
    text = "-" if value is None else format(value, spec)
    return text.rjust(width)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sizes = [int(s) for s in args.matmul_sizes.split(",") if s]

    import torch

    from online_dpo.config.recipe import load_recipe
    from online_dpo.pipeline.run import Run

    matmul_before = matmul_throughput(sizes, args.matmul_reps)
    load_start = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="round_bench_"))
    recipe = load_recipe(args.recipe, [f"rounds={args.rounds}", *args.overrides,
                                       "name=bench", f"output_dir={tmp}"])
    run = Run(recipe)
    watcher = RoundWatcher(run.dir, recipe.rounds)
    watcher.start()
    t0 = time.perf_counter()
    try:
        run.execute()
        wall = time.perf_counter() - t0
        watcher.stop.set()
        watcher.join()
        watcher.poll()
        final_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        # Same process, same thread settings as training (after vLLM's in-process import).
        matmul_after = matmul_throughput(sizes, args.matmul_reps)
        # The best of both: on a shared machine a busy neighbour only ever lowers the figure.
        peak_flops = max(matmul_before["peak_flops_per_second"],
                         matmul_after["peak_flops_per_second"])
        n_params = sum(p.numel() for p in run.models.policy.parameters())
        n_head = run.models.policy.get_output_embeddings().weight.numel()
        rows = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
        rounds = []
        for row in rows:
            k = row["round"]
            fl = round_flops_inputs(run.dir, k, recipe.train.epochs, recipe.train.padding_free)
            train = fl["train"]
            phase = row["phase_seconds"]
            round_s = row["round_seconds"]
            train_s, ref_s = train.get("train_seconds"), train.get("reference_seconds")
            train_flops = 6 * ((n_params - n_head) * fl["train_tokens"] + n_head * fl["train_scored"])
            ref_flops = 2 * ((n_params - n_head) * fl["reference_tokens"] + n_head * fl["reference_scored"])
            train_fps = train_flops / train_s if train_s else None
            both_fps = ((train_flops + ref_flops) / (train_s + ref_s)
                        if train_s and ref_s is not None else None)
            sync_phase = phase.get("sync")
            sync_file = run.dir / f"round_{k}" / "sync.json"
            sync_info = json.loads(sync_file.read_text()) if sync_file.exists() else {}
            sub = {
                "sample_generation": row.get("generation_seconds"),
                "sync_push": row.get("sync_seconds"),
                "sync_verify": sync_info.get("verify_seconds"),
                "train_reference_logps": ref_s,
                "train_loop": train_s,
                # Mostly the checkpoint save (and loading the pairs dataset).
                "train_other": (phase["train"] - train_s - (ref_s or 0.0)
                                if train_s is not None and phase.get("train") is not None
                                else None),
                "eval_generation": row.get("eval_generation_seconds"),
                # KL scoring (reference, and pi_0 once the reference has moved) and judging.
                "eval_other": (phase["eval"] - row["eval_generation_seconds"]
                               if row.get("eval_generation_seconds") is not None
                               and phase.get("eval") is not None else None),
            }
            rss = watcher.seen.get(k, {})
            rounds.append({
                "round": k,
                "phase_seconds": {p: phase.get(p) for p in PHASES},
                "sub_phase_seconds": sub,
                "round_seconds": round_s,
                "train_pairs": row.get("train_pairs"),
                "optimizer_steps": row.get("optimizer_steps"),
                "pairs_per_hour": (row.get("train_pairs") or 0) / round_s * 3600,
                "sampled_tokens": row.get("sampled_tokens"),
                "sampled_tokens_per_second": row.get("tokens_per_second"),
                "sync_phase_share": sync_phase / round_s if sync_phase is not None else None,
                # The weight push alone, without the verification probe.
                "sync_push_seconds": row.get("sync_seconds"),
                "sync_push_share": (row["sync_seconds"] / round_s
                                    if row.get("sync_seconds") is not None else None),
                "peak_rss_gib_so_far": (gib_from_kib(rss["peak_rss_kib"])
                                        if "peak_rss_kib" in rss else None),
                "rss_gib_at_round_end": (gib_from_kib(rss["rss_kib"])
                                         if rss.get("rss_kib") is not None else None),
                "load_average_1min_at_round_end": rss.get("load_average"),
                "train_seconds": train_s,
                "reference_seconds": ref_s,
                "reference_logps_from": fl.get("reference_logps_from"),
                "pair_tokens": fl["pair_tokens"],
                "train_tokens": fl["train_tokens"],
                "reference_tokens": fl["reference_tokens"],
                "train_flops": train_flops,
                "train_flops_per_second": train_fps,
                "train_fraction_of_matmul": train_fps / peak_flops if train_fps else None,
                "train_plus_ref_flops_per_second": both_fps,
                "train_plus_ref_fraction_of_matmul": both_fps / peak_flops if both_fps else None,
            })
    finally:
        watcher.stop.set()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    steady = [r for r in rounds if r["round"] > 1] or rounds
    keys = ["round_seconds", "train_pairs", "pairs_per_hour", "sampled_tokens_per_second",
            "sync_phase_share", "sync_push_seconds", "sync_push_share", "train_seconds",
            "reference_seconds", "train_flops_per_second", "train_fraction_of_matmul",
            "train_plus_ref_flops_per_second", "train_plus_ref_fraction_of_matmul",
            "rss_gib_at_round_end"]
    medians = {key: median_or_none([r[key] for r in steady]) for key in keys}
    medians["phase_seconds"] = {p: median_or_none([r["phase_seconds"][p] for r in steady])
                                for p in PHASES}
    sub_keys = list(rounds[0]["sub_phase_seconds"]) if rounds else []
    medians["sub_phase_seconds"] = {
        key: median_or_none([r["sub_phase_seconds"][key] for r in steady]) for key in sub_keys}

    # ------------------------------------------------------------------ report
    print()
    print("=" * 100)
    print(f"round_bench: {args.recipe} rounds={recipe.rounds} overrides={args.overrides or '[]'}")
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, cpus {os.cpu_count()}, "
          f"1-min load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, per "
          f"round end: {[_round2(r['load_average_1min_at_round_end']) for r in rounds]}")
    print("NOTE: one run on a shared, noisy machine; ratios measured in this run, not assertions.")
    print("      With other jobs running, 2 torch threads can be many times slower than 1: "
          "try --threads 1.")
    print("Round 1 is a warm-up (its sample phase includes the fresh engine's probe); medians "
          "exclude it.")
    print(f"execute() wall {wall:.1f} s (incl. model load + engine start + reports); "
          f"sum of round seconds {sum(r['round_seconds'] for r in rounds):.1f} s")
    print()
    print("Per-phase seconds")
    header = f"{'round':>5} " + " ".join(f"{p:>9}" for p in PHASES) + f" {'round':>9}"
    print(header)
    for r in rounds:
        print(f"{r['round']:>5} " + " ".join(fmt(r["phase_seconds"][p], ".2f", 9) for p in PHASES)
              + fmt(r["round_seconds"], ".2f", 10))
    print(f"{'med':>5} " + " ".join(fmt(medians["phase_seconds"][p], ".2f", 9) for p in PHASES)
          + fmt(medians["round_seconds"], ".2f", 10))
    print()
    print("Inside the phases (seconds)")
    print(f"{'round':>5} " + " ".join(f"{key:>{max(len(key), 8)}}" for key in sub_keys))
    for r in rounds:
        print(f"{r['round']:>5} " + " ".join(
            fmt(r["sub_phase_seconds"][key], ".2f", max(len(key), 8)) for key in sub_keys))
    print(f"{'med':>5} " + " ".join(
        fmt(medians["sub_phase_seconds"][key], ".2f", max(len(key), 8)) for key in sub_keys))
    print()
    print("Throughput, sync share and memory")
    print(f"{'round':>5} {'pairs':>6} {'pairs/h':>9} {'sample tok/s':>13} {'sync phase %':>13} "
          f"{'sync push %':>12} {'peak RSS GiB':>13} {'RSS GiB':>8}")
    for r in rounds:
        print(f"{r['round']:>5} {r['train_pairs'] or 0:>6} {fmt(r['pairs_per_hour'], '.0f', 9)} "
              f"{fmt(r['sampled_tokens_per_second'], '.1f', 13)} "
              f"{fmt(pct(r['sync_phase_share']), '.2f', 13)} "
              f"{fmt(pct(r['sync_push_share']), '.2f', 12)} "
              f"{fmt(r['peak_rss_gib_so_far'], '.2f', 13)} "
              f"{fmt(r['rss_gib_at_round_end'], '.2f', 8)}")
    print(f"{'med':>5} {'':>6} {fmt(medians['pairs_per_hour'], '.0f', 9)} "
          f"{fmt(medians['sampled_tokens_per_second'], '.1f', 13)} "
          f"{fmt(pct(medians['sync_phase_share']), '.2f', 13)} "
          f"{fmt(pct(medians['sync_push_share']), '.2f', 12)} "
          f"{'':>13} {fmt(medians['rss_gib_at_round_end'], '.2f', 8)}")
    print("  sync phase % = sync step seconds (weight push + verification probe) / round seconds"
          " (goal < 5%); sync push % = the weight push alone")
    print(f"  peak RSS of the process (ru_maxrss) at the end: "
          f"{gib_from_kib(final_peak_kib):.2f} GiB"
          " (includes the in-process vLLM engine and its KV cache)")
    print()
    print("Training FLOP/s vs fp32 matmul in this process")
    for label, mm in (("before run", matmul_before), ("after run", matmul_after)):
        per = ", ".join(f"{n}: {v['flops_per_second'] / 1e9:.1f}" for n, v in mm["sizes"].items())
        print(f"  matmul GFLOP/s {label}, {mm['threads']} threads: {per} "
              f"(median of {args.matmul_reps}; peak {mm['peak_flops_per_second'] / 1e9:.1f})")
    print(f"  denominator: {peak_flops / 1e9:.1f} GFLOP/s (best of the above)")
    lo = min(matmul_before["peak_flops_per_second"], matmul_after["peak_flops_per_second"])
    if lo < 0.75 * peak_flops:
        print("  WARNING: matmul throughput changed by more than 25% between before and after the "
              "run: the machine's load changed; FLOP/s fractions are unreliable.")
    print(f"  n_params (policy, tied weights counted once) = {n_params:,}; n_head = {n_head:,}")
    print(f"  formula: {FLOPS_FORMULA}")
    print(f"{'round':>5} {'ref from':>9} {'T_train':>8} {'T_ref':>6} {'train s':>8} {'ref s':>7} "
          f"{'train GF/s':>11} {'frac':>6} {'tr+ref GF/s':>12} {'frac':>6}")
    for r in rounds:
        print(f"{r['round']:>5} {str(r['reference_logps_from']):>9} {r['train_tokens']:>8} "
              f"{r['reference_tokens']:>6} {fmt(r['train_seconds'], '.2f', 8)} "
              f"{fmt(r['reference_seconds'], '.2f', 7)} "
              f"{fmt(_g(r['train_flops_per_second']), '.2f', 11)} "
              f"{fmt(r['train_fraction_of_matmul'], '.3f', 6)} "
              f"{fmt(_g(r['train_plus_ref_flops_per_second']), '.2f', 12)} "
              f"{fmt(r['train_plus_ref_fraction_of_matmul'], '.3f', 6)}")
    print(f"{'med':>5} {'':>9} {'':>8} {'':>6} {fmt(medians['train_seconds'], '.2f', 8)} "
          f"{fmt(medians['reference_seconds'], '.2f', 7)} "
          f"{fmt(_g(medians['train_flops_per_second']), '.2f', 11)} "
          f"{fmt(medians['train_fraction_of_matmul'], '.3f', 6)} "
          f"{fmt(_g(medians['train_plus_ref_flops_per_second']), '.2f', 12)} "
          f"{fmt(medians['train_plus_ref_fraction_of_matmul'], '.3f', 6)}")
    print()
    median_label = "rounds 2.." + str(rounds[-1]["round"]) if len(rounds) > 1 else "round 1 only"
    print(f"Medians over {median_label} (round 1 excluded as warm-up):")
    print(f"  pairs/hour {fmt(medians['pairs_per_hour'], '.0f', 0)}, "
          f"sampled tok/s {fmt(medians['sampled_tokens_per_second'], '.1f', 0)}, "
          f"sync share {fmt(pct(medians['sync_phase_share']), '.2f', 0)}% (goal < 5%), "
          f"train FLOP/s fraction of matmul {fmt(medians['train_fraction_of_matmul'], '.3f', 0)}, "
          f"peak RSS {gib_from_kib(final_peak_kib):.2f} GiB")

    result = {
        "recipe": args.recipe, "rounds": recipe.rounds, "overrides": args.overrides,
        "note": "one run on a shared, noisy machine; ratios, not assertions",
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "load_average_start": load_start,
        "load_average_end": os.getloadavg(), "matmul_peak_used": peak_flops,
        "execute_wall_seconds": wall, "n_params": n_params, "n_head": n_head, "flops_formula": FLOPS_FORMULA,
        "matmul_before_run": matmul_before, "matmul_after_run": matmul_after,
        "peak_rss_gib": gib_from_kib(final_peak_kib),
        "per_round": rounds, "medians_excluding_round_1": medians,
        "median_rounds": [r["round"] for r in steady],
        "argv": sys.argv,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _g(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def _round2(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


if __name__ == "__main__":
    sys.exit(main())
