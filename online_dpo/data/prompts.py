"""Prompt datasets: any local file `datasets` reads, or a `save_to_disk` folder, with a `prompt` column."""

from __future__ import annotations

from pathlib import Path

import datasets

from online_dpo.config.compat import prompt_token_limit
from online_dpo.storage.model_files import resolve_model_path

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetError(ValueError):
    pass


def load_local_dataset(path: str) -> datasets.Dataset:
    p = Path(path)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: not a datasets save_to_disk folder ({e})") from None
        return ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
    if not p.exists():
        raise DatasetError(f"dataset not found: {path}")
    fmt = _FORMATS.get(p.suffix)
    if fmt is None:
        raise DatasetError(f"{path}: unsupported format {p.suffix!r} (use {sorted(_FORMATS)})")
    return datasets.load_dataset(fmt, data_files=str(p), split="train")


def load_prompt_rows(path: str) -> list[dict]:
    """Rows with a non-empty `prompt`: a string or a list of chat messages. Other columns ride along."""
    ds = load_local_dataset(path)
    if "prompt" not in ds.column_names:
        raise DatasetError(f"{path}: missing column 'prompt' (columns: {ds.column_names})")
    rows = ds.to_list()
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            ok = bool(prompt.strip())
        else:
            ok = isinstance(prompt, list) and len(prompt) > 0 and all(
                isinstance(m, dict) and "role" in m and "content" in m for m in prompt
            )
        if not ok:
            raise DatasetError(f"{path}: row {i}: column 'prompt' is empty or malformed: {prompt!r}")
    return rows


def to_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def prompt_token_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The tokens the sampler and the trainer see: the chat template with its generation prompt."""
    text = tokenizer.apply_chat_template(to_messages(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def drop_long_prompts(rows: list[dict], tokenizer, limit: int, max_share: float,
                      source: str) -> tuple[list[dict], int]:
    """Rows whose templated prompt fits in `limit` tokens, and how many were dropped; refuses a
    dataset the limit would cut by more than `max_share`. A prompt that does not fit would make
    the sampler raise mid-round (on every process, with an engine per process)."""
    kept = [row for row in rows if len(prompt_token_ids(tokenizer, row["prompt"])) <= limit]
    dropped = len(rows) - len(kept)
    if dropped > max_share * len(rows):
        raise DatasetError(
            f"{source}: {dropped} of {len(rows)} prompts are longer than {limit} tokens (data.max_prompt_tokens, "
            f"by default generation.max_model_len - generation.max_tokens); dropping them would exceed "
            f"data.max_dropped_share={max_share}. Raise generation.max_model_len or shorten the prompts")
    return kept, dropped


def sampling_prompts(recipe, path: str | None = None) -> tuple[list[dict], int]:
    """The prompts of `path` (default: the recipe's data.prompts) that fit the recipe's sampler
    (data.max_prompt_tokens), and how many did not."""
    from transformers import AutoTokenizer

    path = path or recipe.data.prompts
    rows = load_prompt_rows(path)  # a missing column fails before the tokenizer loads
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(recipe.model.path, recipe.model.revision))
    return drop_long_prompts(rows, tokenizer, prompt_token_limit(recipe), recipe.data.max_dropped_share, path)


def split_prompts(rows: list[dict], eval_prompts: int) -> tuple[list[dict], list[dict]]:
    """Held-out eval prompts come from the end of the file; the rest are training prompts."""
    if eval_prompts >= len(rows):
        raise DatasetError(
            f"data.eval_prompts={eval_prompts} leaves no training prompts out of {len(rows)} rows"
        )
    cut = len(rows) - eval_prompts
    return rows[:cut], rows[cut:]
