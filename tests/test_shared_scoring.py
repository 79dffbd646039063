"""Frozen scoring shared across processes (online_dpo/training/shared_scoring.py): each process
scores its share, the values come back in order on every process, and they equal one process's."""

import json
import os
import subprocess
import sys

import torch

from online_dpo.training.logprobs import score_sequences
from online_dpo.training.shared_scoring import deal, shares
from tests.conftest import REPO


def test_deal_balances_sizes_and_is_deterministic():
    sizes = [50, 10, 10, 10, 10, 10, 5]
    bins = deal(sizes, 2)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert sorted(sum(sizes[i] for i in b) for b in bins) == [50, 55]
    assert deal(sizes, 2) == bins
    assert deal([3, 3], 4) == [[0], [1], [], []]


def test_a_prompts_sequences_stay_on_one_process():
    sequences = [([1, 2], [3]), ([4], [5, 6]), ([1, 2], [7, 8]), ([9], [10])]
    parts = shares(sequences, 2)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3]
    assert any({0, 2} <= set(p) for p in parts)


def _sequences() -> list:
    """Uneven on purpose: one prompt with 10 samples (2 batches of 8 on one process), 4 short ones."""
    torch.manual_seed(0)
    ids = lambda n: torch.randint(10, 200, (n,)).tolist()  # noqa: E731
    long_prompt = ids(30)
    sequences = [(long_prompt, ids(int(n))) for n in torch.randint(3, 12, (10,))]
    return sequences + [(ids(4), ids(5)) for _ in range(4)]


def test_two_processes_score_their_shares_and_equal_one(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sequences = _sequences()
    (tmp_path / "sequences.json").write_text(json.dumps(sequences))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "shared_scoring_worker.py"), str(tiny_model_dir), str(tmp_path / "sequences.json"),
           str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    one = score_sequences(model, sequences, 2, torch.device("cpu"))
    tokens_alone = sum(len(p) + len(c) for p, c in sequences)
    for name in ("whole", "sharded"):
        got = [torch.tensor(r[name]["values"]) for r in ranks]
        assert torch.equal(got[0], got[1])  # every process holds every value, in order
        torch.testing.assert_close(got[0], one, atol=1e-4, rtol=1e-5)  # float32 rounding
        per_process = ranks[0][name]["per_process"]
        assert per_process == [10, 4] or per_process == [4, 10], per_process
        # Each process ran its own share, not the whole set.
        assert all(r[name]["tokens"] < tokens_alone for r in ranks)
    # Whole models: the process with 4 sequences runs 1 forward, the other 2.
    assert sorted(r["whole"]["forwards"] for r in ranks) == [1, 2]
    # Sharded: forwards are collective, so the lighter process pads to the busier one's count.
    assert [r["sharded"]["forwards"] for r in ranks] == [2, 2]
