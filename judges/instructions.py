"""Verifiable instruction following, judged by IFEval's own checkers (the `if-verifiable` package).

A prompt row names its constraints the way IFEval's data does: `instruction_id_list` (for example
`["punctuation:no_comma", "startend:end_checker"]`) and `kwargs`, one mapping of arguments per
instruction (`{"end_phrase": "Is there anything else?"}`). `InstructionFollowingJudge.score` is the
fraction of the row's instructions that the completion follows, in IFEval's strict sense (the
completion as it is, with no lines or markdown removed).

Two checkers load NLTK's sentence tokenizer, a download this framework never makes at run time; a
dataset that uses them is refused when the run loads, unless the data is already installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from judges.protocol import Row

# Each calls nltk's punkt tokenizer (count_sentences, word_tokenize in if_verifiable.ifeval), whose
# data is a separate download; the others need only the installed packages (langdetect ships its
# language profiles).
NEEDS_NLTK_DATA = ("length_constraints:number_sentences", "change_case:capital_word_frequency")


def registry() -> dict[str, type]:
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def nltk_data_missing(instruction_id: str) -> str | None:
    """Why this checker cannot run here (its NLTK data is absent), or None when it can."""
    if instruction_id not in NEEDS_NLTK_DATA:
        return None
    checker = registry()[instruction_id](instruction_id)
    checker.build_description(**{key: _PROBE_ARGS[key] for key in checker.get_instruction_args_keys()})
    try:
        checker.check_following("One sentence. Another One.")
    except LookupError as missing:
        resource = next((line.strip() for line in str(missing).splitlines() if "Resource" in line), "")
        return f"it needs NLTK data that is not installed ({resource or 'punkt'})"
    return None


_PROBE_ARGS = {"num_sentences": 2, "relation": "at least", "capital_frequency": 1, "capital_relation": "at least"}


class InstructionFollowingJudge:
    """score = followed instructions / instructions, with IFEval's strict checkers.

    `instructions_column` and `kwargs_column` name the row's IFEval columns. `check_rows` refuses,
    before any model loads, a row whose instruction is unknown, needs absent NLTK data, or lacks
    an argument (IFEval's checkers would otherwise draw a random one, and the score would not be
    reproducible).
    """

    def __init__(self, instructions_column: str = "instruction_id_list", kwargs_column: str = "kwargs"):
        self.instructions_column = instructions_column
        self.kwargs_column = kwargs_column

    def instructions(self, row: Row) -> tuple[list[str], list[dict[str, Any]]]:
        ids = row.get(self.instructions_column)
        if not isinstance(ids, list) or not ids:
            raise KeyError(f"prompt row has no list of instructions in column {self.instructions_column!r}")
        kwargs = row.get(self.kwargs_column) or [{} for _ in ids]
        if not isinstance(kwargs, list) or len(kwargs) != len(ids):
            raise ValueError(f"column {self.kwargs_column!r} must hold one mapping per instruction "
                             f"({len(ids)} instructions: {ids})")
        return ids, [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]

    def check_rows(self, rows: Sequence[Row]) -> None:
        known, unusable = registry(), {}
        for i, row in enumerate(rows):
            try:
                ids, kwargs = self.instructions(row)
            except (KeyError, ValueError) as bad:
                raise ValueError(f"prompt row {i}: {bad}") from None
            for instruction_id, kw in zip(ids, kwargs, strict=True):
                if instruction_id not in known:
                    raise ValueError(f"prompt row {i}: unknown IFEval instruction {instruction_id!r}")
                checker = known[instruction_id](instruction_id)
                missing = sorted(set(checker.get_instruction_args_keys() or ()) - set(kw) - {"prompt"})
                if missing:
                    raise ValueError(f"prompt row {i}: instruction {instruction_id!r} lacks the argument(s) "
                                     f"{missing} in {self.kwargs_column!r}")
                try:
                    checker.build_description(**kw)
                except (TypeError, ValueError) as bad:
                    raise ValueError(f"prompt row {i}: instruction {instruction_id!r}: {bad}") from None
                if instruction_id not in unusable:
                    unusable[instruction_id] = nltk_data_missing(instruction_id)
        refused = {i: why for i, why in unusable.items() if why}
        if refused:
            raise ValueError("the prompts use IFEval instructions that cannot be checked here: "
                             + "; ".join(f"{i}: {why}" for i, why in refused.items()))

    def followed(self, row: Row, completion: str) -> list[bool]:
        """Each instruction's strict verdict, in the row's order."""
        from if_verifiable.common import evaluate_instructions

        from judges.rules import prompt_text

        ids, kwargs = self.instructions(row)
        results, _ = evaluate_instructions(completion, ids, kwargs, prompt_text(row), registry())
        verdicts = {r.instruction_id: r.strict_pass for r in results}
        # An empty completion has no results: it follows nothing.
        return [bool(verdicts.get(i, False)) for i in ids]

    def score(self, row: Row, completion: str) -> float:
        verdicts = self.followed(row, completion)
        return sum(verdicts) / len(verdicts)

    def eval_metrics(self, records: Sequence[tuple[Row, list[str]]]) -> dict[str, Any]:
        """IFEval's two headline numbers over held-out (row, completions), each with a 95% interval
        from a bootstrap over prompts: prompt-level strict accuracy (every instruction followed)
        and instruction-level strict accuracy (followed instructions / instructions)."""
        from online_dpo.analysis.statistics import bootstrap_mean

        prompt_level, instruction_level = [], []
        for row, completions in records:
            verdicts = [self.followed(row, c) for c in completions]
            prompt_level.append([float(all(v)) for v in verdicts])
            instruction_level.append([float(x) for v in verdicts for x in v])
        result = {}
        for name, groups in (("prompt_level_strict_accuracy", prompt_level),
                             ("instruction_level_strict_accuracy", instruction_level)):
            interval = bootstrap_mean(groups)
            result[name] = interval.value if interval else None
            result[f"{name}_ci"] = interval.ci if interval else None
        return result
