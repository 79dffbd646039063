import json

import datasets
import pytest

from online_dpo.config.data import PromptSource
from online_dpo.data.prompts import DatasetError, drop_duplicates, load_prompt_rows, split_prompts


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
    rows = [{"prompt": str(i)} for i in range(50)]
    train, held = split_prompts(rows[:5], 2, "tail")
    assert [r["prompt"] for r in held] == ["3", "4"] and len(train) == 3
    train, held = split_prompts(rows, 10)  # random, seeded by data.split_seed
    assert len(held) == 10 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len(train) == 40 and held != rows[-10:]  # not the file's end: a source-ordered file mixes
    assert split_prompts(rows, 10) == (train, held) and split_prompts(rows, 10, seed=1)[1] != held
    with pytest.raises(DatasetError, match="eval_prompts"):
        split_prompts([{"prompt": "a"}], 1)


def test_a_dataset_dict_split_a_column_and_a_filter(tmp_path):
    """UltraFeedback's layout: a DatasetDict with train_prefs/test_prefs and a `prompt`-less schema."""
    folder = tmp_path / "uf"
    datasets.DatasetDict({
        "train_prefs": datasets.Dataset.from_dict({"question": ["a?", "b?", "c?"], "source": ["x", "y", "x"]}),
        "test_prefs": datasets.Dataset.from_dict({"question": ["t?"], "source": ["x"]}),
    }).save_to_disk(str(folder))
    source = PromptSource(path=str(folder), split="train_prefs", column="question", where={"source": "x"})
    assert [r["prompt"] for r in load_prompt_rows(source)] == ["a?", "c?"]
    assert load_prompt_rows(PromptSource(path=str(folder), split="test_prefs", column="question"))[0]["prompt"] == "t?"
    with pytest.raises(DatasetError, match=r"no split 'train' \(splits: \['test_prefs', 'train_prefs'\]\)"):
        load_prompt_rows(PromptSource(path=str(folder), column="question"))
    with pytest.raises(DatasetError, match="missing column 'topic'"):
        load_prompt_rows(PromptSource(path=str(folder), split="train_prefs", column="question", where={"topic": 1}))


def test_a_messages_column_keeps_the_system_prompt_and_earlier_turns(tmp_path):
    conversation = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi?"},
                    {"role": "assistant", "content": "Salut."}, {"role": "user", "content": "And bye?"},
                    {"role": "assistant", "content": "Au revoir."}]  # the recorded reply goes
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": conversation}) + "\n")
    rows = load_prompt_rows(PromptSource(path=str(path), messages_column="messages"))
    assert rows[0]["prompt"] == conversation[:4]


def test_exact_duplicates_are_dropped_and_counted():
    rows = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}, {"prompt": [{"role": "user", "content": "a"}]}]
    kept, dropped = drop_duplicates(rows)
    assert [r["prompt"] for r in kept] == ["a", "b", [{"role": "user", "content": "a"}]] and dropped == 1


def test_an_hf_dataset_absent_from_the_cache_is_named():
    with pytest.raises(DatasetError, match="'someone/absent-dataset'.*HF_DATASETS_OFFLINE"):
        load_prompt_rows(PromptSource(path="someone/absent-dataset", split="train"))


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


def test_held_out_prompts_from_a_split_of_their_own(tiny_model_dir, tmp_path):
    from online_dpo.config.recipe import recipe_from_dict, recipe_to_dict
    from online_dpo.data.prompts import run_prompts
    from tests.conftest import tiny_recipe_dict

    folder = tmp_path / "ds"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["a?", "b?", "a?", "c?"]}),
        "test": datasets.Dataset.from_dict({"prompt": ["t?", "u?"]}),
    }).save_to_disk(str(folder))
    body = tiny_recipe_dict(tiny_model_dir, folder, tmp_path / "runs")
    body["data"].update(prompts={"path": str(folder), "split": "train"},
                        eval_prompts={"path": str(folder), "split": "test"})
    recipe = recipe_from_dict(body)
    prompts = run_prompts(recipe)
    assert [r["prompt"] for r in prompts.train] == ["a?", "b?", "c?"]
    assert [r["prompt"] for r in prompts.eval] == ["t?", "u?"]
    assert prompts.counts["duplicate_prompts"] == 1 and prompts.counts["eval_prompts"] == 2
    # The mapping is in the resolved recipe, so a resume under another dataset is refused.
    assert recipe_to_dict(recipe)["data"]["eval_prompts"]["split"] == "test"
