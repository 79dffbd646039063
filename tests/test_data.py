import json

import datasets
import pytest

from online_dpo.data.prompts import DatasetError, load_prompt_rows, split_prompts


def test_jsonl_and_save_to_disk_and_conversational(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?", "gold": "4"}) + "\n"
                    + json.dumps({"prompt": "Yo?", "gold": "5"}) + "\n")
    rows = load_prompt_rows(str(path))
    assert rows == [{"prompt": "Hi?", "gold": "4"}, {"prompt": "Yo?", "gold": "5"}]
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi?"}]]}).save_to_disk(str(folder))
    assert load_prompt_rows(str(folder))[0]["prompt"][0]["content"] == "Hi?"


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "Hi?"}) + "\n")
    with pytest.raises(DatasetError, match="missing column 'prompt'"):
        load_prompt_rows(str(path))


def test_empty_prompt_names_the_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(DatasetError, match="row 1: column 'prompt' is empty"):
        load_prompt_rows(str(path))


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_prompt_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DatasetError, match="unsupported format"):
        load_prompt_rows(str(tmp_path / "p.txt"))


def test_split_keeps_eval_prompts_out_of_training():
    train, held = split_prompts([{"prompt": str(i)} for i in range(5)], 2)
    assert [r["prompt"] for r in held] == ["3", "4"] and len(train) == 3
    with pytest.raises(DatasetError, match="eval_prompts"):
        split_prompts([{"prompt": "a"}], 1)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_preference_data_in_every_format(tmp_path, fmt):
    from online_dpo.data.offline_pairs import load_preference_rows

    ds = datasets.Dataset.from_dict({"prompt": ["Hi?", "Yo?"], "chosen": ["Hello.", "Hey."],
                                     "rejected": ["Go away.", "No."]})
    path = tmp_path / (f"prefs.{fmt}" if fmt != "save_to_disk" else "prefs")
    {"jsonl": lambda: ds.to_json(str(path), lines=True), "json": lambda: ds.to_json(str(path), lines=False),
     "parquet": lambda: ds.to_parquet(str(path)), "csv": lambda: ds.to_csv(str(path), index=False),
     "save_to_disk": lambda: ds.save_to_disk(str(path))}[fmt]()
    rows = load_preference_rows(str(path))
    assert [(r["row"]["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("Hi?", "Hello.", "Go away."), ("Yo?", "Hey.", "No.")]


def test_preference_data_errors_name_column_and_row(tmp_path):
    from online_dpo.data.offline_pairs import load_preference_rows

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a"}) + "\n")
    with pytest.raises(DatasetError, match="missing column 'rejected'"):
        load_preference_rows(str(path))
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DatasetError, match="row 1: column 'prompt' is empty"):
        load_preference_rows(str(path))


def test_prompts_too_long_for_the_sampler_are_dropped_and_counted(tokenizer_dir):
    from transformers import AutoTokenizer

    from online_dpo.data.prompts import drop_long_prompts, prompt_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = [{"prompt": "Hi?"}, {"prompt": "word " * 300}, {"prompt": [{"role": "user", "content": "Yo?"}]}]
    lengths = [len(prompt_token_ids(tokenizer, r["prompt"])) for r in rows]
    assert lengths[1] > 300 > lengths[0]  # the chat template counts too
    kept, dropped = drop_long_prompts(rows, tokenizer, limit=lengths[1] - 1, max_share=0.5, source="p.jsonl")
    assert kept == [rows[0], rows[2]] and dropped == 1
    assert drop_long_prompts(rows, tokenizer, limit=lengths[1], max_share=0.0, source="p.jsonl") == (rows, 0)
    with pytest.raises(DatasetError, match=r"p.jsonl: 1 of 3 prompts are longer than .* data.max_dropped_share=0.2"):
        drop_long_prompts(rows, tokenizer, limit=lengths[1] - 1, max_share=0.2, source="p.jsonl")
