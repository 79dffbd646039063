"""A local sequence-classification reward model as a pointwise judge.

It formats each (prompt, completion) with the reward model's *own* tokenizer and chat template,
never the policy's: a reward model scores the text format it was trained on.
"""

from __future__ import annotations

import torch

from judges.protocol import Row


def conversation(row: Row, completion: str) -> list[dict]:
    prompt = row["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return messages + [{"role": "assistant", "content": completion}]


def format_for_reward_model(tokenizer, row: Row, completion: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(conversation(row, completion), tokenize=False)
    prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    return f"{prompt}\n{completion}"


class RewardModelJudge:
    """Pointwise: the reward model's scalar output. `score_batch` scores many at once: the whole
    round's samples in one call when the judge step prefetches them (ReliableJudge.prefetch_scores),
    in batches of similar length under a token budget.

    A sequence over `max_length` tokens keeps its end, where a reward model reads its score, and
    loses the start of its prompt (`truncated` counts them; pop_stats reports it per round). With
    `on_truncation: "fail"` such a sample fails with the reason instead of being scored."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, dtype: str = "auto",
                 device: str = "auto", max_batch_tokens: int = 16384, on_truncation: str = "keep_end",
                 revision: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from online_dpo.storage.model_files import default_device, resolve_model_path, torch_dtype

        try:  # a folder, or a hub ID from the HF cache
            path = str(resolve_model_path(path, revision))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"reward model: {error}") from None
        if on_truncation not in ("keep_end", "fail"):
            raise ValueError(f"RewardModelJudge: on_truncation must be 'keep_end' or 'fail', got {on_truncation!r}")
        # "auto": the first GPU, else CPU. On a shared GPU give the judge its own, e.g. "cuda:1".
        self.device = default_device() if device == "auto" else str(torch.device(device))
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"RewardModelJudge: device {device!r} needs CUDA, and this machine has none")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype(dtype, self.device)
        ).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path!r} has num_labels={self.model.config.num_labels}, expected 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size  # sequences per forward, at most
        self.max_batch_tokens = max_batch_tokens  # padded tokens per forward, at most
        self.max_length = max_length
        self.on_truncation = on_truncation
        self.truncated = 0
        # Why score_batch gives None for a sample (ReliableJudge fails that sample with it).
        self.no_score_reason = f"longer than max_length={max_length} tokens (on_truncation: fail)"

    def score(self, row: Row, completion: str) -> float:
        return self.score_batch([(row, completion)])[0]

    @torch.no_grad()
    def score_batch(self, items: list[tuple[Row, str]]) -> list[float | None]:
        """Scores in the items' order; None for a sample that fails (on_truncation: fail)."""
        ids = [self.tokenizer(format_for_reward_model(self.tokenizer, row, c), add_special_tokens=False).input_ids
               for row, c in items]
        long = {i for i, seq in enumerate(ids) if len(seq) > self.max_length}
        self.truncated += len(long)
        ids = [seq[-self.max_length:] for seq in ids]  # keep the end: the answer and its last token
        out: list[float | None] = [None] * len(items)
        todo = [i for i in range(len(items)) if not (self.on_truncation == "fail" and i in long)]
        for group in length_batches([len(ids[i]) for i in todo], self.batch_size, self.max_batch_tokens):
            batch = [todo[g] for g in group]
            enc = self.tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(self.device)
            for i, value in zip(batch, self.model(**enc).logits[:, 0].float().tolist(), strict=True):
                out[i] = value
        return out

    def pop_stats(self) -> dict:
        stats, self.truncated = {"reward_model_truncated": self.truncated}, 0
        return stats


def length_batches(lengths: list[int], max_seqs: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length (sorted), each group at most `max_seqs` sequences and
    `max_tokens` padded tokens (a longer sequence is a group of its own), so little is padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max_seqs and (len(batches[-1]) + 1) * lengths[i] <= max_tokens:
            batches[-1].append(i)  # sorted ascending: lengths[i] is the group's longest so far
        else:
            batches.append([i])
    return batches
