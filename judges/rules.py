"""Deterministic rule-based judges with explicit scoring functions."""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?)\"']\s*$")
_WORD = re.compile(r"[a-z]{3,}")
_STOPWORDS = frozenset(
    "what about tell give explain describe write short note quick interesting fact child "
    "should everyone know answer briefly sentence related why care with that this the and "
    "for you are one how".split()
)


def prompt_text(row: dict) -> str:
    """The last user message of a row's prompt (a string or a list of chat messages)."""
    prompt = row.get("prompt", "")
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def conversation_text(row: dict) -> str:
    """The whole prompt for a judge to read: a string as it is, a lone user message as its text,
    and a conversation (a system prompt, earlier turns) as one "Role: text" paragraph per turn."""
    prompt = row.get("prompt", "")
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def topic_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


class ConciseAnswerJudge:
    """Rewards short, on-topic answers that end cleanly: a style a 135M model learns in a few rounds.

    score = brevity + ending + on_topic, in [0, 3]:
      brevity  = max(0, 1 - words / max_words)   (0 at max_words or longer)
      ending   = 1 if the text ends a sentence (., !, ?, a closing bracket or quote), else 0
      on_topic = 1 if the answer uses a content word of the prompt (e.g. "volcanoes"), else 0
    A completion cut off by max_tokens rarely ends a sentence, so the rule also rewards stopping.
    Fewer than `min_words` words scores 0: brevity is only worth something with content.
    """

    def __init__(self, max_words: int = 60, min_words: int = 3):
        if max_words <= min_words:
            raise ValueError(f"max_words ({max_words}) must exceed min_words ({min_words})")
        self.max_words = max_words
        self.min_words = min_words

    def score(self, row: dict, completion: str) -> float:
        words = len(completion.split())
        if words < self.min_words:
            return 0.0
        brevity = max(0.0, 1.0 - words / self.max_words)
        ending = 1.0 if _SENTENCE_END.search(completion) else 0.0
        wanted = topic_words(prompt_text(row))
        on_topic = 1.0 if wanted & topic_words(completion) else 0.0
        return brevity + ending + on_topic


class InformativeAnswerJudge:
    """A held-out evaluation rule, deliberately unlike ConciseAnswerJudge (it has no length bonus):

    score = on_topic + complete + diversity, in [0, 3]:
      on_topic  = share of the prompt's content words the answer uses (capped at 1)
      complete  = 1 if the answer has at least `min_words` words and ends a sentence, else 0
      diversity = distinct words / words (repetition and degenerate loops score low)
    `question_column` reads the question from that column instead of the prompt: a judge that must
    not see the prompt's constraints (the instruction-following showcase's win rate).
    """

    def __init__(self, min_words: int = 8, question_column: str | None = None):
        self.min_words = min_words
        self.question_column = question_column

    def check_rows(self, rows: list[dict]) -> None:
        if self.question_column and any(not row.get(self.question_column) for row in rows):
            raise KeyError(f"a prompt row has no question in column {self.question_column!r}")

    def score(self, row: dict, completion: str) -> float:
        words = completion.lower().split()
        if not words:
            return 0.0
        question = str(row[self.question_column]) if self.question_column else prompt_text(row)
        wanted = topic_words(question)
        on_topic = len(wanted & topic_words(completion)) / len(wanted) if wanted else 0.0
        complete = float(len(words) >= self.min_words and bool(_SENTENCE_END.search(completion)))
        return min(on_topic, 1.0) + complete + len(set(words)) / len(words)
