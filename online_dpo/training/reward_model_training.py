"""`online-dpo train-rm`: a Bradley-Terry reward model from any prompt/chosen/rejected dataset.

loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))   (Bradley & Terry 1952; Ouyang et al. 2022)

The result is a HF sequence-classification folder that `judges.reward_model:RewardModelJudge`
loads. Held-out pair accuracy is printed and saved in `<out>/reward_model_metrics.json`, and the
held-out pairs with the trained model's rewards in `<out>/held_out_pairs.jsonl`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from judges.reward_model import format_for_reward_model
from online_dpo.data.offline_pairs import load_preference_rows
from online_dpo.data.prompts import DatasetError
from online_dpo.storage.artifacts import write_dir_atomic, write_json, write_jsonl


def load_pairs(path: str) -> list[dict]:
    if len(rows := load_preference_rows(path)) < 4:
        raise DatasetError(f"{path}: {len(rows)} pairs is too few to train and hold some out")
    return rows


def _rewards(model, tokenizer, items, device, max_length) -> torch.Tensor:
    texts = [format_for_reward_model(tokenizer, row, c) for row, c in items]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False).to(device)
    return model(**enc).logits[:, 0].float()


@torch.no_grad()
def pair_rewards(model, tokenizer, pairs, device, max_length=512, batch_pairs=8) -> list[tuple[float, float]]:
    """(chosen reward, rejected reward) of each pair."""
    model.eval()
    out = []
    for s in range(0, len(pairs), batch_pairs):
        chunk = pairs[s:s + batch_pairs]
        r = _rewards(model, tokenizer, [(p["row"], p["chosen"]) for p in chunk]
                     + [(p["row"], p["rejected"]) for p in chunk], device, max_length).tolist()
        out += zip(r[:len(chunk)], r[len(chunk):])
    return out


def accuracy(rewards: list[tuple[float, float]]) -> float:
    return sum(c > r for c, r in rewards) / max(len(rewards), 1)


def pair_accuracy(model, tokenizer, pairs, device, max_length=512, batch_pairs=8) -> float:
    return accuracy(pair_rewards(model, tokenizer, pairs, device, max_length, batch_pairs))


def train_reward_model(pairs_path: str, base: str, out: str, *, epochs: int = 2, lr: float = 2e-5,
                       batch_pairs: int = 4, eval_fraction: float = 0.2, seed: int = 0,
                       max_length: int = 512, base_revision: str | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from online_dpo.storage.model_files import default_device, resolve_model_path

    pairs = load_pairs(pairs_path)
    rng = random.Random(seed)
    rng.shuffle(pairs)
    n_eval = max(1, int(len(pairs) * eval_fraction))
    train, held_out = pairs[n_eval:], pairs[:n_eval]

    base_dir = resolve_model_path(base, base_revision)
    device = default_device()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    before = pair_accuracy(model, tokenizer, held_out, device, max_length)
    t0, losses = time.perf_counter(), []
    for epoch in range(epochs):
        model.train()
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in tqdm(range(0, len(order), batch_pairs), desc=f"reward model epoch {epoch + 1}", leave=False):
            chunk = [train[i] for i in order[s:s + batch_pairs]]
            r = _rewards(model, tokenizer, [(p["row"], p["chosen"]) for p in chunk]
                         + [(p["row"], p["rejected"]) for p in chunk], device, max_length)
            loss = -F.logsigmoid(r[:len(chunk)] - r[len(chunk):]).mean()
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite reward-model loss {loss.item()}; lower the learning rate")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    held_out_rewards = pair_rewards(model, tokenizer, held_out, device, max_length)
    metrics = {
        "train_pairs": len(train), "held_out_pairs": len(held_out),
        "held_out_accuracy_before": before,
        "held_out_accuracy": accuracy(held_out_rewards),
        "train_accuracy": pair_accuracy(model, tokenizer, train, device, max_length),
        "final_loss": sum(losses[-5:]) / len(losses[-5:]), "seconds": time.perf_counter() - t0,
        "base": str(base_dir), "pairs": str(pairs_path),
    }

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "reward_model_metrics.json", metrics)
        # The held-out pairs with the rewards the trained model gave them, to check the saved
        # folder (weights, tokenizer, chat template) scores them the same way.
        write_jsonl(tmp / "held_out_pairs.jsonl",
                    [{"row": p["row"], "chosen": p["chosen"], "rejected": p["rejected"],
                      "chosen_reward": c, "rejected_reward": r}
                     for p, (c, r) in zip(held_out, held_out_rewards)])

    write_dir_atomic(Path(out), save)
    return metrics
