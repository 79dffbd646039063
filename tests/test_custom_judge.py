"""Runs exactly the custom-judge example of judges/README.md (code and recipe lines)."""

import importlib.util
import json
import re

import pytest
import yaml

from judges import Preference
from online_dpo.config.recipe import recipe_from_dict
from online_dpo.pipeline.run import Run
from tests.conftest import REPO, tiny_recipe_dict


def readme_blocks(lang):
    text = (REPO / "judges" / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def readme_judge(folder):
    """KeywordJudge from the README's code, written to `folder`/my_judge.py and imported from there."""
    path = folder / "my_judge.py"
    path.write_text(readme_blocks("python")[0])
    spec = importlib.util.spec_from_file_location(f"readme_my_judge_{id(folder)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KeywordJudge()


def test_readme_code_is_the_shipped_example():
    shipped = (REPO / "examples" / "my_judge.py").read_text()
    assert readme_blocks("python")[0] in shipped
    assert len(readme_blocks("python")[0].splitlines()) <= 25


@pytest.mark.parametrize("first, second, preference, reason", [
    # The keyword (any case) wins even when the other answer is shorter.
    ("The MOON is bright tonight.", "Cheese is tasty.", Preference.FIRST, "only one answer mentions 'moon'"),
    ("Cheese is tasty.", "The moon is bright tonight.", Preference.SECOND, "only one answer mentions 'moon'"),
    ("one two three", "four five six seven eight", Preference.TIE, "same keyword use, similar length"),
    ("one two", "three four five six seven", Preference.FIRST, "shorter answer"),
    ("The moon rises in the east, as always.", "Moon.", Preference.SECOND, "shorter answer"),
])
def test_readme_judge_reasons(tmp_path, first, second, preference, reason):
    judgment = readme_judge(tmp_path).judge({"prompt": "Tell me about it.", "keyword": "Moon"}, first, second)
    assert (judgment.preference, judgment.reason) == (preference, reason)


def test_readme_custom_judge_runs(tiny_model_dir, tmp_path, monkeypatch):
    judge = readme_judge(tmp_path)  # also the my_judge.py the run imports
    prompts = tmp_path / "prompts.jsonl"
    topics = ["moon", "coffee", "volcano", "chess", "bread", "river", "train", "snow"]
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the {t}.", "keyword": t}) + "\n"
                               for t in topics))
    judge_section = yaml.safe_load(readme_blocks("yaml")[0])
    data = tiny_recipe_dict(tiny_model_dir, prompts, tmp_path / "runs", **judge_section,
                            **{"data.eval_prompts": 2, "rounds": 1})
    monkeypatch.chdir(tmp_path)  # the README says: run from the folder holding my_judge.py
    rows = Run(recipe_from_dict(data)).execute()
    assert rows[0]["position_flip_rate"] == 0.0  # both orders asked; this judge never flips
    round_dir = tmp_path / "runs" / "tiny" / "round_1"
    records = [json.loads(x) for x in (round_dir / "samples.jsonl").read_text().splitlines()]
    judgments = [json.loads(x) for x in (round_dir / "judgments.jsonl").read_text().splitlines()]
    assert len(records) == len(judgments) == 4  # data.prompts_per_round
    compared = 0
    for record, judgment in zip(records, judgments):
        texts = [s["text"] for s in record["samples"]]
        for c in judgment["comparisons"]:
            # Each recorded verdict and reason is the README judge's own for those two samples.
            expected = judge.judge(record["row"], texts[c["first"]], texts[c["second"]])
            assert (c["preference"], c["reason"]) == (expected.preference.value, expected.reason)
            compared += 1
    assert compared == 4 * 3  # round robin over 3 samples per prompt
