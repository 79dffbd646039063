"""A local sequence-classification reward model as a pointwise judge.

It formats each (prompt, completion) with the reward model's *own* tokenizer and chat template,
never the policy's: a reward model scores the text format it was trained on.
"""

from __future__ import annotations

from pathlib import Path

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
    """Pointwise: the reward model's scalar output. `score_batch` scores many at once."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, dtype: str = "auto",
                 device: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from online_dpo.storage.model_files import default_device, torch_dtype

        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"reward model {path!r} is not a local HF model folder")
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
        self.batch_size = batch_size
        self.max_length = max_length

    def score(self, row: Row, completion: str) -> float:
        return self.score_batch([(row, completion)])[0]

    @torch.no_grad()
    def score_batch(self, items: list[tuple[Row, str]]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            texts = [format_for_reward_model(self.tokenizer, row, c) for row, c in chunk]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False).to(self.device)
            out.extend(self.model(**enc).logits[:, 0].float().tolist())
        return out
