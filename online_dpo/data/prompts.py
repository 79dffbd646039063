"""Prompt datasets: a local file or folder, or an HF dataset, with a prompt column (a string or chat
messages) or a messages column; exact duplicates dropped; a held-out set chosen at random, from
the file's end, or from a dataset of its own."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from online_dpo.config.compat import prompt_token_limit
from online_dpo.config.data import PromptSource
from online_dpo.storage.model_files import resolve_model_path

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetError(ValueError):
    pass


def _split_of(ds, split: str | None, source: str):
    if not isinstance(ds, datasets.DatasetDict):
        if split not in (None, "train"):
            raise DatasetError(f"{source}: has one split; split {split!r} does not exist")
        return ds
    name = split or "train"
    if name not in ds:
        raise DatasetError(f"{source}: no split {name!r} (splits: {sorted(ds)}); set split:")
    return ds[name]


def load_local_dataset(path: str, split: str | None = None) -> datasets.Dataset:
    p = Path(path)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except FileNotFoundError:  # not a save_to_disk folder: a folder of data files
            try:
                ds = datasets.load_dataset(str(p))
            except (FileNotFoundError, ValueError) as e:
                raise DatasetError(f"{path}: neither a save_to_disk folder nor a folder of data files ({e})") from None
        return _split_of(ds, split, path)
    if not p.exists():
        raise DatasetError(f"dataset not found: {path}")
    fmt = _FORMATS.get(p.suffix)
    if fmt is None:
        raise DatasetError(f"{path}: unsupported format {p.suffix!r} (use {sorted(_FORMATS)})")
    return _split_of(datasets.load_dataset(fmt, data_files=str(p), split="train"), split, path)


def load_source(source: PromptSource) -> datasets.Dataset:
    """A local path as above, else an HF dataset name from the HF datasets cache."""
    local = source.path.startswith((".", "/", "~")) or Path(source.path).suffix in _FORMATS
    if local or Path(source.path).expanduser().exists():
        return load_local_dataset(str(Path(source.path).expanduser()), source.split)
    try:
        ds = datasets.load_dataset(source.path, source.config, revision=source.revision)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; each becomes one clear message
        raise DatasetError(f"dataset {source.path!r} (config {source.config}, revision {source.revision or 'main'}) "
                           f"could not be loaded: {type(e).__name__}: {e}. An HF dataset is read from the "
                           "datasets cache while HF_DATASETS_OFFLINE=1 (the CLI's default)") from None
    return _split_of(ds, source.split, source.path)


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _up_to_last_user_turn(messages, where: str) -> list[dict]:
    if not _is_messages(messages):
        raise DatasetError(f"{where}: not a list of chat messages with role and content: {messages!r}")
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise DatasetError(f"{where}: no user turn in {messages!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:users[-1] + 1]]


def load_prompt_rows(source: str | PromptSource) -> list[dict]:
    """Rows with a non-empty `prompt`: a string or a list of chat messages. Other columns ride along."""
    source = source if isinstance(source, PromptSource) else PromptSource(path=source)
    ds = load_source(source)
    name = source.path + (f" [{source.split}]" if source.split else "")
    column = source.messages_column or source.column
    for key in [column, *source.where]:
        if key not in ds.column_names:
            raise DatasetError(f"{name}: missing column {key!r} (columns: {ds.column_names})")
    rows = ds.to_list()
    for key, wanted in source.where.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        rows = [row for row in rows if row[key] in allowed]
    if not rows:
        raise DatasetError(f"{name}: no rows left after where: {source.where}")
    for i, row in enumerate(rows):
        prompt = row[column]
        if source.messages_column:
            prompt = _up_to_last_user_turn(prompt, f"{name}: row {i}: column {column!r}")
        if isinstance(prompt, str):
            ok = bool(prompt.strip())
        else:
            ok = bool(prompt) and _is_messages(prompt)
        if not ok:
            raise DatasetError(f"{name}: row {i}: column {column!r} is empty or malformed: {prompt!r}")
        row["prompt"] = prompt
    return rows


def drop_duplicates(rows: list[dict]) -> tuple[list[dict], int]:
    """The first of each exactly repeated prompt, and how many repeats were dropped."""
    seen, kept = set(), []
    for row in rows:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


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


def sampling_prompts(recipe, source: str | PromptSource | None = None) -> tuple[list[dict], dict]:
    """The prompts of `source` (default: the recipe's data.prompts), without exact duplicates and
    fitting the recipe's sampler (data.max_prompt_tokens), and what was dropped."""
    from transformers import AutoTokenizer

    source = source or recipe.data.prompts
    rows, duplicates = drop_duplicates(load_prompt_rows(source))  # a missing column fails before the tokenizer loads
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(recipe.model.path, recipe.model.revision))
    name = source.path if isinstance(source, PromptSource) else source
    kept, dropped = drop_long_prompts(rows, tokenizer, prompt_token_limit(recipe), recipe.data.max_dropped_share, name)
    return kept, {"duplicate_prompts": duplicates, "dropped_long_prompts": dropped}


@dataclass
class PromptSet:
    train: list[dict]
    eval: list[dict]
    counts: dict = field(default_factory=dict)  # prompts.json: what was loaded, dropped and held out


def run_prompts(recipe) -> PromptSet:
    """The run's training and held-out prompts (data.prompts, data.eval_prompts, data.eval_split)."""
    data = recipe.data
    rows, dropped = sampling_prompts(recipe)
    if isinstance(data.eval_prompts, PromptSource):
        held_out, dropped_eval = sampling_prompts(recipe, data.eval_prompts)
        train = rows
        dropped.update({f"eval_{k}": v for k, v in dropped_eval.items()})
    else:
        train, held_out = split_prompts(rows, data.eval_prompts, data.eval_split, data.split_seed)
    counts = {"prompts": len(rows), **dropped, "train_prompts": len(train), "eval_prompts": len(held_out),
              "max_prompt_tokens": prompt_token_limit(recipe)}
    return PromptSet(train, held_out, counts)


def split_prompts(rows: list[dict], eval_prompts: int, how: str = "random",
                  seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training, held-out) prompts: `eval_prompts` held out at random (seeded) or from the end."""
    if eval_prompts >= len(rows):
        raise DatasetError(
            f"data.eval_prompts={eval_prompts} leaves no training prompts out of {len(rows)} rows"
        )
    if how == "tail":
        cut = len(rows) - eval_prompts
        return rows[:cut], rows[cut:]
    held = set(random.Random(seed).sample(range(len(rows)), eval_prompts))
    return ([r for i, r in enumerate(rows) if i not in held],
            [r for i, r in enumerate(rows) if i in held])
