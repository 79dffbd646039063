"""Plain Python functions as judges, for verifiable tasks with a gold answer in the prompt row."""

from __future__ import annotations

import re

from judges.protocol import Judgment, Preference, Row


def _load_function(path: str):
    from judges.loading import JudgeLoadError, resolve_target

    fn = resolve_target(path)
    if not callable(fn):
        raise JudgeLoadError(f"function {path!r} is not callable")
    return fn


class PointwiseFunction:
    """`function(row, completion) -> float`, named as "module:function"."""

    def __init__(self, function: str):
        self.function = _load_function(function)

    def score(self, row: Row, completion: str) -> float:
        return self.function(row, completion)


class PairwiseFunction:
    """`function(row, first, second) -> "first" | "second" | "tie"` (or a Preference/Judgment)."""

    def __init__(self, function: str):
        self.function = _load_function(function)

    def judge(self, row: Row, first: str, second: str) -> Judgment:
        answer = self.function(row, first, second)
        if isinstance(answer, Judgment):
            return answer
        try:
            preference = Preference(answer)
        except ValueError:
            raise ValueError(f"judge function returned {answer!r}; expected first/second/tie") from None
        return Judgment(preference, f"function said {preference.value}")


def gold_answer(row: Row, column: str) -> str:
    if column not in row:
        raise KeyError(f"prompt row has no gold-answer column {column!r} (has {sorted(row)})")
    return str(row[column])


def check_gold_column(rows: list[Row], column: str) -> None:
    """Refuse, when the run loads, prompts without the gold-answer column."""
    for i, row in enumerate(rows):
        if row.get(column) in (None, ""):
            raise KeyError(f"prompt row {i} has no gold answer in column {column!r} (has {sorted(row)})")


def _normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


class GoldAnswerJudge:
    """1.0 when the row's gold answer (column `column`) appears in the completion, else 0.0."""

    def __init__(self, column: str = "answer"):
        self.column = column

    def check_rows(self, rows: list[Row]) -> None:
        check_gold_column(rows, self.column)

    def score(self, row: Row, completion: str) -> float:
        gold = _normalize(gold_answer(row, self.column))
        return float(bool(gold) and f" {gold} " in f" {_normalize(completion)} ")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in `text` ("1,234" -> "1234", "5.0" -> "5"), or None if there is none."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


class ExactAnswerJudge:
    """Strict exact match for verifiable tasks: 1.0 when the completion's only or final number
    equals the row's gold answer, else 0.0. Unlike `GoldAnswerJudge` it cannot be gamed by listing
    candidates: "23, 24, 25" answers 25."""

    def __init__(self, column: str = "answer"):
        self.column = column

    def check_rows(self, rows: list[Row]) -> None:
        check_gold_column(rows, self.column)
        for i, row in enumerate(rows):
            if final_number(str(row[self.column])) is None:
                raise ValueError(f"prompt row {i}: gold answer {row[self.column]!r} is not a number")

    def score(self, row: Row, completion: str) -> float:
        gold = final_number(gold_answer(row, self.column))
        if gold is None:
            raise ValueError(f"gold answer {row[self.column]!r} is not a number")
        return float(final_number(completion) == gold)
