"""The offline-vs-online experiment's three recipes, shortened onto the tiny model, then compared."""

import json

from online_dpo.analysis.compare_command import budgets, load_run
from online_dpo.config.recipe import load_recipe, recipe_to_dict
from online_dpo.pipeline.run import Run
from tests.conftest import REPO, cli

# A random tiny model never states a right answer: a rule judge decides its pairs instead.
SHORT = ["generation.backend=transformers", "generation.max_tokens=12", "train.micro_batch_pairs=2",
         "judge.target=judges.rules:ConciseAnswerJudge", "judge.kwargs={max_words: 20, min_words: 1}"]
# 4 prompts a round; mode fully_online derives data.prompts_per_round (2 x 2) and refuses another.
PER_ROUND = {"offline": ["data.prompts_per_round=4", "train.grad_accum_steps=1"],
             "iterative": ["data.prompts_per_round=4", "train.grad_accum_steps=1"],
             "fully_online": ["train.grad_accum_steps=2"]}


def test_shortened_comparison(tiny_model_dir, tmp_path):
    folder = REPO / "recipes" / "offline_vs_online"
    assert "compare" in (folder / "run.sh").read_text()
    names = []
    for recipe_name, rounds in (("offline", 2), ("iterative", 2), ("fully_online", 2)):
        # The held-out metric is objective in every arm: strict exact match against gold answers.
        shipped = load_recipe(folder / f"{recipe_name}.yaml")
        assert shipped.judge.target == "judges.functions:ExactAnswerJudge" and shipped.eval.judge is None
        assert recipe_to_dict(shipped)["data"]["prompts"].endswith("times_and_sums.jsonl")
        recipe = load_recipe(folder / f"{recipe_name}.yaml",
                             [*SHORT, *PER_ROUND[recipe_name], f"rounds={rounds}", f"output_dir={tmp_path}",
                              f"model.path={tiny_model_dir}"])
        Run(recipe).execute()
        names.append(recipe.name)
    out = cli("compare", *[str(tmp_path / n) for n in names], "--out", str(tmp_path / "cmp"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(n in out.stdout for n in names)
    for png in ("win_rate.png", "frontier.png", "length.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 1000
    rows = [json.loads(x) for x in (tmp_path / "ovo_offline" / "metrics.jsonl").read_text().splitlines()]
    # Evaluated after the last round only (eval.every: 0), with its interval.
    assert rows[0].get("win_rate_vs_pi0") is None and rows[0].get("eval_judge_score") is None
    assert rows[-1]["win_rate_vs_pi0"] is not None and rows[-1]["kl_to_pi0"] is not None
    assert rows[-1]["eval_judge_score_ci"] is not None
    # Each arm does what its name says, at the same prompt, pair and sampling budget.
    runs = {n: load_run(tmp_path / n) for n in names}
    offline, iterative, fully = (runs[n]["rows"] for n in names)
    # Offline: pi_0 sampled once for every round's prompts (charged to round 1), then never again;
    # the reference stays pi_0.
    assert [(r["prompts"], r["sampled_tokens"] > 0) for r in offline] == [(8, True), (0, False)]
    assert [r["reference_source_round"] for r in offline] == [0, 0]
    # Online arms sample fresh prompts every round.
    for arm in (iterative, fully):
        assert [(r["prompts"], r["sampled_tokens"] > 0) for r in arm] == [(4, True), (4, True)]
    # Iterative: 2 epochs of 2 optimizer steps a round, the reference swapped to the policy every round.
    assert [(r["optimizer_steps"], r["reference_source_round"]) for r in iterative] == [(4, 1), (4, 2)]
    # Fully online: one optimizer step per round (sample, judge, one step, sync).
    assert [r["optimizer_steps"] for r in fully] == [1, 1]
    totals = [budgets(run) for run in runs.values()]
    for key in ("prompts", "train_pairs", "sampled_tokens"):
        assert len({t[key] for t in totals}) == 1, (key, totals)


def test_the_staleness_arms_are_the_iterative_arm_but_for_the_sampling_policy():
    """stale1.yaml and stale2.yaml differ from iterative.yaml in their name and max_staleness alone,
    so the quality study compares staleness and nothing else (staleness.sh)."""
    folder = REPO / "recipes" / "offline_vs_online"
    base = recipe_to_dict(load_recipe(folder / "iterative.yaml"))
    assert "stale1" in (folder / "staleness.sh").read_text() and "compare" in (folder / "staleness.sh").read_text()
    for s in (1, 2):
        stale = recipe_to_dict(load_recipe(folder / f"stale{s}.yaml"))
        assert stale["generation"]["max_staleness"] == s and stale["name"] == f"ovo_stale{s}"
        stale["generation"]["max_staleness"], stale["name"] = 0, base["name"]
        assert stale == base
