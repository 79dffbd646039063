"""Runs exactly the custom-judge example of judges/README.md (code and recipe lines)."""

import json
import re

import yaml

from online_dpo.config import recipe_from_dict
from online_dpo.run import Run
from tests.conftest import REPO, tiny_recipe_dict


def readme_blocks(lang):
    text = (REPO / "judges" / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_code_is_the_shipped_example():
    shipped = (REPO / "examples" / "my_judge.py").read_text()
    assert readme_blocks("python")[0] in shipped
    assert len(readme_blocks("python")[0].splitlines()) <= 25


def test_readme_custom_judge_runs(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "my_judge.py").write_text(readme_blocks("python")[0])
    prompts = tmp_path / "prompts.jsonl"
    topics = ["moon", "coffee", "volcano", "chess", "bread", "river", "train", "snow"]
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about the {t}.", "keyword": t}) + "\n"
                               for t in topics))
    judge_section = yaml.safe_load(readme_blocks("yaml")[0])
    data = tiny_recipe_dict(tiny_model_dir, prompts, tmp_path / "runs", **judge_section,
                            **{"data.eval_prompts": 2, "rounds": 1})
    monkeypatch.chdir(tmp_path)  # the README says: run from the folder holding my_judge.py
    rows = Run(recipe_from_dict(data)).execute()
    assert rows[0]["position_flip_rate"] is not None
    judgments = (tmp_path / "runs" / "tiny" / "round_1" / "judgments.jsonl").read_text()
    assert "similar length" in judgments or "shorter answer" in judgments or "mentions" in judgments
