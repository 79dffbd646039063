"""Offline preference data as pair columns: a fixed dataset, tokenized with the policy's template.

Accepts standard (`prompt`/`chosen`/`rejected` strings) and conversational (lists of messages)
columns; a missing or empty column is an error naming the column and the row.
"""

from __future__ import annotations

from online_dpo.data.prompts import DatasetError, load_local_dataset

PAIR_COLUMNS = ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids",
                "chosen_sample_logp", "rejected_sample_logp", "sampler_round", "replay", "reason",
                "prompt_index")


def completion_text(value, column: str, index: int, path: str) -> str:
    """A completion given as a string or as a list of messages (the last one is the answer)."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{path}: row {index}: column {column!r} is empty or malformed: {value!r}")
    return value


def load_preference_rows(path: str) -> list[dict]:
    """[{"row": {...prompt row...}, "chosen": str, "rejected": str}] with every field checked."""
    ds = load_local_dataset(path)
    for column in ("prompt", "chosen", "rejected"):
        if column not in ds.column_names:
            raise DatasetError(f"{path}: missing column {column!r} (columns: {ds.column_names})")
    out = []
    for i, row in enumerate(ds.to_list()):
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ok = bool(prompt) and all(isinstance(m, dict) and m.get("content") for m in prompt)
        else:
            ok = isinstance(prompt, str) and bool(prompt.strip())
        if not ok:
            raise DatasetError(f"{path}: row {i}: column 'prompt' is empty or malformed: {prompt!r}")
        out.append({"row": row, "chosen": completion_text(row["chosen"], "chosen", i, path),
                    "rejected": completion_text(row["rejected"], "rejected", i, path)})
    if not out:
        raise DatasetError(f"{path}: no preference pairs")
    return out


def pair_columns_from_dataset(path: str, models) -> dict[str, list]:
    """Tokenize an external preference dataset into the columns a round's pairs/ folder holds."""
    columns: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    eos = models.tokenizer.eos_token_id
    for i, item in enumerate(load_preference_rows(path)):
        prompt = item["row"]["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        for side in ("chosen", "rejected"):
            ids = models.tokenizer(item[side], add_special_tokens=False).input_ids + [eos]
            columns[f"{side}_ids"].append(ids)
            columns[side].append([{"role": "assistant", "content": item[side]}])
            columns[f"{side}_sample_logp"].append(0.0)
        columns["prompt"].append(messages)
        columns["prompt_ids"].append(models.prompt_ids(prompt))
        columns["sampler_round"].append(None)  # not sampled by any policy of this run
        columns["replay"].append(False)
        columns["reason"].append("offline dataset")
        columns["prompt_index"].append(i)
    return columns


def take_prompts(columns: dict[str, list], start: int, count: int) -> dict[str, list]:
    """The rows of `count` prompts starting at the `start`-th prompt (in order of first
    appearance), cycling through the pool: one pair per prompt, or every example of a prompt."""
    groups: dict[int, list[int]] = {}
    for row, index in enumerate(columns["prompt_index"]):
        groups.setdefault(index, []).append(row)
    order = list(groups.values())
    picked = [row for i in range(min(count, len(order))) for row in order[(start + i) % len(order)]]
    return {c: [columns[c][i] for i in picked] for c in columns}


EXAMPLE_COLUMNS = ("prompt", "completion", "label", "prompt_ids", "completion_ids", "sample_logp",
                   "sampler_round", "score", "prompt_index")


def load_example_rows(path: str) -> list[dict]:
    """A KTO dataset's rows (`prompt`, `completion` as a string or messages, boolean `label`),
    every field checked; each row gets its completion's text under `completion_text`."""
    ds = load_local_dataset(path)
    for column in ("prompt", "completion", "label"):
        if column not in ds.column_names:
            raise DatasetError(f"{path}: missing column {column!r} (columns: {ds.column_names})")
    rows = []
    for i, row in enumerate(ds.to_list()):
        if not isinstance(row["label"], bool):
            raise DatasetError(f"{path}: row {i}: column 'label' must be true/false, got {row['label']!r}")
        prompt = row["prompt"]
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise DatasetError(f"{path}: row {i}: column 'prompt' is empty")
        rows.append({**row, "completion_text": completion_text(row["completion"], "completion", i, path)})
    if not rows:
        raise DatasetError(f"{path}: no examples")
    return rows


def example_columns_from_dataset(path: str, models) -> dict[str, list]:
    """A KTO dataset as the columns a round's pairs/ folder holds. Rows that share a prompt share
    a prompt_index, so a round takes `data.prompts_per_round` prompts with all their examples."""
    columns: dict[str, list] = {c: [] for c in EXAMPLE_COLUMNS}
    eos = models.tokenizer.eos_token_id
    prompt_index: dict[str, int] = {}
    for row in load_example_rows(path):
        prompt, text = row["prompt"], row["completion_text"]
        columns["prompt"].append([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt)
        columns["completion"].append([{"role": "assistant", "content": text}])
        columns["label"].append(row["label"])
        columns["prompt_ids"].append(models.prompt_ids(prompt))
        columns["completion_ids"].append(models.tokenizer(text, add_special_tokens=False).input_ids + [eos])
        columns["sample_logp"].append(0.0)
        columns["sampler_round"].append(None)
        columns["score"].append(None)
        columns["prompt_index"].append(prompt_index.setdefault(repr(prompt), len(prompt_index)))
    return columns
