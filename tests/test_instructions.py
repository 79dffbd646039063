"""The instruction-following showcase: IFEval's own checkers as the judge, its data, and a run.

The checkers are if-verifiable's, called for real; the run is the tiny model's, on real files.
"""

import json
import subprocess
import sys

import pytest

from judges.instructions import NEEDS_NLTK_DATA, InstructionFollowingJudge, nltk_data_missing
from judges.rules import InformativeAnswerJudge
from online_dpo.config.recipe import RecipeError, load_recipe, recipe_from_dict
from online_dpo.pipeline.run import Run
from tests.conftest import REPO, tiny_recipe_dict

DATA = REPO / "recipes" / "data"


def ifeval_row(*constraints) -> dict:
    ids = [c[0] for c in constraints]
    return {"prompt": "Describe rivers briefly.", "question": "Describe rivers briefly.",
            "instruction_id_list": ids, "kwargs": [c[1] for c in constraints]}


LOWER_NO_COMMA = ifeval_row(("change_case:english_lowercase", {}), ("punctuation:no_comma", {}))


def test_the_score_is_the_fraction_of_instructions_followed():
    judge = InstructionFollowingJudge()
    assert judge.score(LOWER_NO_COMMA, "rivers carry water to the sea.") == 1.0
    assert judge.score(LOWER_NO_COMMA, "rivers carry water, then reach the sea.") == 0.5
    assert judge.score(LOWER_NO_COMMA, "Rivers carry water, then reach the sea.") == 0.0
    assert judge.score(LOWER_NO_COMMA, "") == 0.0
    ending = ifeval_row(("startend:end_checker", {"end_phrase": "Any other questions?"}),
                        ("length_constraints:number_words", {"num_words": 8, "relation": "less than"}))
    assert judge.score(ending, "Rivers flow downhill. Any other questions?") == 1.0
    assert judge.followed(ending, "Rivers flow downhill to the sea, always, every day. Any other questions?") == [True, False]
    # Strict, as IFEval's headline numbers are: a markdown-bolded phrase does not count.
    assert judge.score(ending, "Rivers flow. **Any other questions?**") == 0.5


def test_a_dataset_the_checkers_cannot_judge_is_refused_naming_the_row():
    judge = InstructionFollowingJudge()
    judge.check_rows([LOWER_NO_COMMA])
    for row, message in (
        (ifeval_row(("punctuation:no_semicolon", {})), "row 1: unknown IFEval instruction 'punctuation:no_semicolon'"),
        (ifeval_row(("startend:end_checker", {})), r"row 1: instruction 'startend:end_checker' lacks the argument\(s\) \['end_phrase'\]"),
        (ifeval_row(("length_constraints:number_words", {"num_words": 5, "relation": "about"})), "row 1: .*relation"),
        ({"prompt": "no constraints here"}, "row 1: .*no list of instructions in column 'instruction_id_list'"),
        ({**LOWER_NO_COMMA, "kwargs": [{}]}, "row 1: column 'kwargs' must hold one mapping per instruction"),
    ):
        with pytest.raises(ValueError, match=message):
            judge.check_rows([LOWER_NO_COMMA, row])


@pytest.mark.parametrize("instruction_id", NEEDS_NLTK_DATA)
def test_a_checker_that_needs_nltk_data_is_refused_when_the_data_is_absent(instruction_id):
    """Nothing is downloaded here, so NLTK's punkt is absent and both checkers are refused at load;
    a machine with the data installed may use them."""
    probe = subprocess.run([sys.executable, "-c", "import nltk; nltk.data.find('tokenizers/punkt_tab/english/')"],
                           capture_output=True)
    if probe.returncode == 0:
        pytest.skip("NLTK's punkt data is installed on this machine")
    kwargs = {"length_constraints:number_sentences": {"num_sentences": 2, "relation": "at least"},
              "change_case:capital_word_frequency": {"capital_frequency": 2, "capital_relation": "at least"}}
    assert "NLTK data" in nltk_data_missing(instruction_id)
    with pytest.raises(ValueError, match=f"cannot be checked here: {instruction_id}: it needs NLTK data"):
        InstructionFollowingJudge().check_rows([ifeval_row((instruction_id, kwargs[instruction_id]))])


def test_every_other_checker_the_showcase_uses_runs_without_downloaded_data():
    rows = [json.loads(line) for name in ("instructions_train.jsonl", "instructions_eval.jsonl")
            for line in (DATA / name).read_text().splitlines()]
    used = {i for row in rows for i in row["instruction_id_list"]}
    assert used.isdisjoint(NEEDS_NLTK_DATA) and all(nltk_data_missing(i) is None for i in used)
    InstructionFollowingJudge().check_rows(rows)


def test_ifevals_prompt_and_instruction_level_accuracy_with_intervals():
    judge = InstructionFollowingJudge()
    one = ifeval_row(("punctuation:no_comma", {}))
    records = [(LOWER_NO_COMMA, ["all good here.", "Not, at all."]),  # 2/2 followed, then 0/2
               (one, ["no commas here", "none here either"])]  # 1/1 twice
    metrics = judge.eval_metrics(records)
    assert metrics["prompt_level_strict_accuracy"] == pytest.approx(3 / 4)
    assert metrics["instruction_level_strict_accuracy"] == pytest.approx(4 / 6)  # not the mean of 3/4 prompts
    lo, hi = metrics["instruction_level_strict_accuracy_ci"]
    assert lo < 4 / 6 < hi  # prompts resampled: 2/4 alone, 2/2 alone


def test_the_shipped_data_is_what_the_generator_writes_and_holds_out_questions_and_pairs(tmp_path):
    sys.path.insert(0, str(DATA))
    try:
        import make_instructions
    finally:
        sys.path.remove(str(DATA))
    train, held_out = make_instructions.build()
    assert (DATA / "instructions_train.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in train)
    assert (DATA / "instructions_eval.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in held_out)
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    train_pairs = {tuple(r["instruction_id_list"]) for r in train}
    unseen = [r for r in held_out if tuple(r["instruction_id_list"]) in make_instructions.UNSEEN_PAIRS]
    assert len(unseen) == 20 and not train_pairs & make_instructions.UNSEEN_PAIRS
    assert all(i in train_pairs for r in unseen for i in ((r["instruction_id_list"][0],), (r["instruction_id_list"][1],)))


def test_the_shipped_recipe_loads():
    recipe = load_recipe(REPO / "recipes" / "instruction_following.yaml")
    assert recipe.judge.target == "judges.instructions:InstructionFollowingJudge"
    assert recipe.eval.win_rate_judge.kwargs == {"question_column": "question"}


def instruction_recipe(tiny_model_dir, tmp_path, rows: list[dict], **overrides) -> dict:
    prompts = tmp_path / "instructions.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tiny_recipe_dict(
        tiny_model_dir, prompts, tmp_path / "runs", rounds=1, **{"data.eval_prompts": 3},
        judge={"target": "judges.instructions:InstructionFollowingJudge"},
        eval={"samples_per_prompt": 2,
              "win_rate_judge": {"target": "judges.rules:InformativeAnswerJudge",
                                 "kwargs": {"question_column": "question", "min_words": 1}}},
        **overrides)


def test_a_run_records_ifevals_numbers_and_a_constraint_blind_win_rate(tiny_model_dir, tmp_path):
    rows = [json.loads(line) for line in (DATA / "instructions_train.jsonl").read_text().splitlines()[:7]]
    run = Run(recipe_from_dict(instruction_recipe(tiny_model_dir, tmp_path, rows)))
    run.execute()
    metrics = json.loads((run.dir / "round_1" / "metrics.json").read_text())
    judge = InstructionFollowingJudge()
    for path, prefix, summary in ((run.dir / "round_1" / "eval_samples.jsonl", "eval_", metrics),
                                  (run.dir / "round_0" / "pi0_eval_samples.jsonl", "",
                                   json.loads((run.dir / "round_0" / "pi0_eval.json").read_text())["judge_metrics"])):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        expected = judge.eval_metrics([(r["row"], [s["text"] for s in r["samples"]]) for r in records])
        for key, value in expected.items():
            assert summary[prefix + key] == pytest.approx(value), key
    # The win rate is the constraint-blind rule's (it reads the question alone), not IFEval's.
    blind = InformativeAnswerJudge(question_column="question", min_words=1)
    policy, pi0 = ([json.loads(line) for line in (run.dir / name).read_text().splitlines()]
                   for name in ("round_1/eval_samples.jsonl", "round_0/pi0_eval_samples.jsonl"))
    outcomes = {"wins": 0, "losses": 0, "ties": 0}
    for p, b in zip(policy, pi0, strict=True):
        for ps, bs in zip(p["samples"], b["samples"], strict=True):
            gap = blind.score(p["row"], ps["text"]) - blind.score(b["row"], bs["text"])
            outcomes["wins" if gap > 0 else "losses" if gap < 0 else "ties"] += 1
    assert {key: metrics[f"{key}_vs_pi0"] for key in outcomes} == outcomes


def test_a_run_on_rows_the_judge_cannot_check_stops_before_any_model_loads(tiny_model_dir, tmp_path):
    rows = [{**ifeval_row(("startend:end_checker", {})), "prompt": f"Question {i}?"} for i in range(7)]
    run = Run(recipe_from_dict(instruction_recipe(tiny_model_dir, tmp_path, rows)))
    with pytest.raises(RecipeError, match="judge InstructionFollowingJudge: prompt row 0: instruction "
                                          "'startend:end_checker' lacks the argument"):
        run.execute()
    assert not run.dir.exists()  # nothing sampled, nothing written


def test_a_win_rate_judge_that_does_not_fit_is_refused_when_the_recipe_loads(tiny_model_dir, tmp_path):
    data = instruction_recipe(tiny_model_dir, tmp_path, [LOWER_NO_COMMA])
    data["eval"]["win_rate_judge"]["kwargs"]["question_col"] = "question"
    with pytest.raises(RecipeError, match="eval.win_rate_judge.kwargs.*question_col"):
        recipe_from_dict(data)
