"""Writes instructions_train.jsonl and instructions_eval.jsonl: general questions, each with one or
two IFEval-style constraints, in IFEval's own columns (`instruction_id_list`, `kwargs`) and in the
wording of IFEval's checkers (`build_description`), so `judges.instructions` can verify them.

The held-out file asks questions that no training row asks, and a third of its rows combine two
constraints that never appear together in training (each constraint on its own does).
`question` keeps the bare question, for a judge that must not see the constraints.

    python recipes/data/make_instructions.py
"""

import itertools
import json
import random
from pathlib import Path

from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT

TOPICS = """volcanoes; rainbows; honey bees; the moon; tides; photosynthesis; earthquakes; thunder;
penguins; the water cycle; glaciers; deserts; coral reefs; magnets; electricity; bread baking;
bicycles; airplanes; trains; bridges; the internet; libraries; museums; chess; soccer; music;
painting; the piano; recycling; compost; forests; rivers; clouds; snow; wind; the sun; stars;
planets; comets; dinosaurs; whales; owls; cats; dogs; horses; elephants; ants; spiders; mushrooms;
tea; coffee; chocolate; rice; apples; bananas; tomatoes; cheese; salt; sugar; soap; glass; paper;
maps; clocks; calendars; umbrellas; candles; kites; boats; lighthouses; castles; pyramids;
gardens; seeds; roots; leaves; sleep; exercise; breakfast; friendship; kindness; patience;
reading; writing; counting; recipes; markets; money; banks; post offices; hospitals; schools;
firefighters; farmers; bakers; teachers; astronauts; sailors; pilots""".replace("\n", " ")
HELD_OUT_TOPICS = """caves; hurricanes; octopuses; the desert fox; windmills; submarines; telescopes;
origami; the violin; lemons; honey; bamboo; frogs; the arctic; rain forests; fireflies; sand dunes;
waterfalls; hot air balloons; the printing press; bees' wax; pottery; yoga; picnics; lanterns;
snails; sunflowers; the compass; skyscrapers; zebras""".replace("\n", " ")
QUESTIONS = ("Explain {} to a child.", "Tell me an interesting fact about {}.", "Why do people care about {}?",
             "Describe {} briefly.")

# The data-free checkers a 135M model can meet within a short answer, with their IFEval arguments.
CONSTRAINTS = {
    "change_case:english_lowercase": [{}],
    "punctuation:no_comma": [{}],
    "startend:quotation": [{}],
    "startend:end_checker": [{"end_phrase": "Is there anything else I can help with?"},
                             {"end_phrase": "Any other questions?"}],
    "length_constraints:number_words": [{"num_words": 25, "relation": "less than"},
                                        {"num_words": 40, "relation": "less than"}],
    "keywords:existence": [{"keywords": ["simple"]}, {"keywords": ["today"]}],
    "detectable_content:postscript": [{"postscript_marker": "P.S."}],
}
# Held-out combinations: never together in training (each appears there with others).
UNSEEN_PAIRS = {("change_case:english_lowercase", "startend:quotation"),
                ("punctuation:no_comma", "startend:end_checker"),
                ("length_constraints:number_words", "detectable_content:postscript")}


def compatible(a: str, b: str) -> bool:
    return b not in INSTRUCTION_CONFLICTS.get(a, {a}) and a not in INSTRUCTION_CONFLICTS.get(b, {b})


def describe(instruction_id: str, kwargs: dict) -> str:
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    return checker.build_description(**kwargs)


def row(question: str, ids: tuple[str, ...], rng: random.Random) -> dict:
    kwargs = [rng.choice(CONSTRAINTS[i]) for i in ids]
    text = " ".join([question, *(describe(i, kw) for i, kw in zip(ids, kwargs, strict=True))])
    return {"prompt": text, "question": question, "instruction_id_list": list(ids), "kwargs": kwargs}


def questions(topics: str) -> list[str]:
    return [q.format(t.strip()) for t in topics.split(";") for q in QUESTIONS]


def build(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    singles = [(i,) for i in CONSTRAINTS]
    pairs = [p for p in itertools.combinations(CONSTRAINTS, 2) if compatible(*p)]
    seen_pairs = [p for p in pairs if p not in UNSEEN_PAIRS]
    train = [row(q, rng.choice(singles + seen_pairs), rng) for q in questions(TOPICS)]
    held_out = []
    for n, q in enumerate(rng.sample(questions(HELD_OUT_TOPICS), 60)):
        kinds = sorted(UNSEEN_PAIRS) if n % 3 == 0 else singles + seen_pairs
        held_out.append(row(q, rng.choice(kinds), rng))
    rng.shuffle(train)
    return train, held_out


if __name__ == "__main__":
    train, held_out = build()
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    here = Path(__file__).parent
    for name, rows in (("instructions_train.jsonl", train), ("instructions_eval.jsonl", held_out)):
        (here / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training and {len(held_out)} held-out prompts in {here}")
