"""A complete custom judge: prefers answers that mention the prompt's keyword, then shorter ones.

Used by judges/README.md and run as-is by tests/test_custom_judge.py.
"""

from judges import Judgment, Preference


class KeywordJudge:
    def __init__(self, keyword_column: str = "keyword", tie_words: int = 2):
        self.keyword_column = keyword_column
        self.tie_words = tie_words

    def judge(self, row: dict, first: str, second: str) -> Judgment:
        keyword = row[self.keyword_column].lower()
        hits = [keyword in first.lower(), keyword in second.lower()]
        if hits[0] != hits[1]:
            winner = Preference.FIRST if hits[0] else Preference.SECOND
            return Judgment(winner, f"only one answer mentions {keyword!r}")
        gap = len(first.split()) - len(second.split())
        if abs(gap) <= self.tie_words:
            return Judgment(Preference.TIE, "same keyword use, similar length")
        return Judgment(Preference.FIRST if gap < 0 else Preference.SECOND, "shorter answer")
