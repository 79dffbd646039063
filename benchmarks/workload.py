"""The workload knobs shared by vs_trl.py and both workers, so the two sides can't drift apart.

Standard library only: trl_worker.py imports it from inside .venv-trl.
"""

import argparse


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=16,
                   help="prompts per run, one pair each (a multiple of micro-batch x grad-accum)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward pass")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
