"""Where a round's training data comes from, chosen once from `mode` and `data.pairs`.

- `JudgedSamples` (online, fully_online): the round's own samples from the current policy, judged.
- `Pi0Pool` (offline, no `data.pairs`): round_0/ samples and judges every round's prompts from pi_0
  once; round k takes its share of that pool.
- `FixedDataset` (offline with `data.pairs`): round k takes its share of a fixed dataset.

Each source names the steps that produce its data, in every round (`round_steps`) and once before
round 1 (`setup_steps`), and `select(k)` returns round k's columns in the objective's schema.
"""

from __future__ import annotations

import random

import datasets

from online_dpo.data.offline_pairs import PAIR_COLUMNS, take_prompts
from online_dpo.storage.artifacts import RunDir, read_json, read_jsonl


class NoPairsError(RuntimeError):
    pass


class JudgedSamples:
    round_steps = ("sample", "judge", "pairs")
    setup_steps: tuple[str, ...] = ()

    def __init__(self, objective, run_dir: RunDir):
        self.objective, self.run_dir = objective, run_dir

    def judged(self, k: int) -> dict[str, list]:
        d = self.run_dir.round(k)
        records, judgments = read_jsonl(d / "samples.jsonl"), read_jsonl(d / "judgments.jsonl")
        return self.objective.from_round(records, judgments, read_json(d / "sample.json")["policy_round"])

    def select(self, k: int) -> dict[str, list]:
        return self.judged(k)

    def staleness(self, k: int, policy_round: int) -> int | None:
        """Policy updates between the policy that sampled round k and `policy_round`'s: the rounds
        between them that trained (one without pairs left the policy as it was)."""
        sampled_by = read_json(self.run_dir.round(k) / "sample.json")["policy_round"]
        return sum(1 for v in range(sampled_by + 1, policy_round + 1)
                   if "skipped" not in read_json(self.run_dir.round(v) / "train.json"))


class Pi0Pool(JudgedSamples):
    round_steps = ("pairs",)
    setup_steps = ("sample", "judge", "pairs")

    def __init__(self, objective, run_dir: RunDir, prompts_per_round: int):
        super().__init__(objective, run_dir)
        self.per = prompts_per_round

    def select(self, k: int) -> dict[str, list]:
        if k == 0:
            return self.judged(0)
        pool = self.run_dir.round(0) / "pairs"
        if not pool.exists():
            raise NoPairsError(f"{self.run_dir.round(0)}: sampling from pi_0 gave no decided pairs (every "
                               "prompt tied or failed); offline mode has nothing to train on")
        return take_prompts(datasets.load_from_disk(str(pool)).to_dict(), (k - 1) * self.per, self.per)

    def staleness(self, k: int, policy_round: int) -> int | None:
        return None  # pi_0's pool, offline by design


class FixedDataset:
    round_steps = ("pairs",)
    setup_steps: tuple[str, ...] = ()

    def __init__(self, objective, path: str, models, prompts_per_round: int):
        self.objective, self.path, self.models, self.per = objective, path, models, prompts_per_round
        self._pool: dict[str, list] | None = None

    def select(self, k: int) -> dict[str, list]:
        if self._pool is None:  # tokenized once per process
            self._pool = self.objective.from_dataset(self.path, self.models)
        return take_prompts(self._pool, (k - 1) * self.per, self.per)

    def staleness(self, k: int, policy_round: int) -> int | None:
        return None


PairSource = JudgedSamples | Pi0Pool | FixedDataset


def build_pair_source(recipe, objective, run_dir: RunDir, models) -> PairSource:
    if recipe.mode != "offline":
        return JudgedSamples(objective, run_dir)
    if recipe.data.pairs is not None:
        return FixedDataset(objective, recipe.data.pairs, models, recipe.data.prompts_per_round)
    return Pi0Pool(objective, run_dir, recipe.data.prompts_per_round)


def add_replay(run_dir: RunDir, k: int, columns: dict[str, list], ratio: float, seed: int) -> int:
    """Mix earlier rounds' fresh pairs into round k's (`ratio` per fresh pair), seeded per round.
    Pairs only: the compatibility check refuses replay with KTO."""
    want = round(ratio * len(columns["prompt"]))
    old = [run_dir.round(j) / "pairs" for j in range(1, k) if (run_dir.round(j) / "pairs").exists()]
    if want == 0 or not old:
        return 0
    # Read into memory: datasets' filter/select would write cache files into finished rounds' folders.
    pool = [row for p in old for row in datasets.load_from_disk(str(p)).to_list()
            if not row["replay"]]  # replay only fresh pairs, never replays
    picks = random.Random(seed * 131 + k).sample(range(len(pool)), min(want, len(pool)))
    for i in picks:
        for c in PAIR_COLUMNS:
            columns[c].append(True if c == "replay" else pool[i][c])
    return len(picks)
