"""`m3 synth`: a deterministic synthetic knowledge task (issue #6).

Invented people with five attributes (birth city, birth year, university, employer, field).
Training text talks about the *seen* people only (biographies in one set of wordings, plus
question-answer lines); the knowledge base holds biographies of seen **and unseen** people in a
different set of wordings. Facts of unseen people exist only in the bank, so a model that
answers questions about them correctly read them from memory.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_dir
from .errors import M3Error

_ONSETS = "b br c d dr f g gr h j k l m n p r s st t th v w z".split()
_VOWELS = "a e i o u ae ai ia io ea".split()
_CODAS = "n l r s th m nd rk ll v x".split()


def _names(rng: random.Random, n: int, syllables: tuple[int, int]) -> list[str]:
    """n distinct invented names of a few syllables (no real people)."""
    out: set[str] = set()
    while len(out) < n:
        k = rng.randint(*syllables)
        name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS + [""])
        out.add(name.capitalize())
    return sorted(out)


CITIES = (
    "Port Adler|Brennmoor|Dunmarch|Ashgrove|Kessel|Halvard|Tellmark|Greywater|Selka|Orrin|Lantern Bay|"
    "Mirefield|Caldera|Windham|Eastmere|Fenwick|Rookhaven|Silverton|Marlow Cross|Duskvale"
).split("|")
UNIVERSITIES = (
    "University of Kessel|Halvard College|Tellmark Polytechnic|Greywater University|Orrin Institute|"
    "Selka Academy|Brennmoor University|Dunmarch College|Ashgrove School of Science|"
    "Caldera University|Windham College|Eastmere Institute"
).split("|")
EMPLOYERS = (
    "Northwind Institute|Lantern Survey Company|Greywater Observatory|Kessel Works|Orrin Shipping|"
    "Selka Mills|Tidewater Labs|Brightline Foundry|Amberly Press|Duskvale Energy|Marlow Bank|"
    "Fenwick Motors|Silverton Health|Rookhaven Studios|Halvard Rail"
).split("|")
FIELDS = (
    "marine chemistry|cartography|astronomy|botany|linguistics|geology|economics|robotics|medicine|"
    "architecture|music theory|mathematics"
).split("|")
ATTRIBUTES = {
    "city": CITIES,
    "year": [str(y) for y in range(1930, 2000)],
    "university": UNIVERSITIES,
    "employer": EMPLOYERS,
    "field": FIELDS,
}

# training text (seen people): one set of wordings
TRAIN_BIOS = (
    "{name} was born in {city} in {year}. {P} studied {field} at {university} and later worked for {employer}.",
    "Born in {year} in {city}, {name} earned a degree in {field} from {university}. {P} joined {employer}.",
    "{name} works for {employer}. {P} was born in {city} in {year} and studied {field} at {university}.",
)
# knowledge base: different wordings, for seen and unseen people
KB_BIOS = (
    "{name}: birthplace {city}; year of birth {year}; alma mater {university}; employer {employer}; "
    "field of work {field}.",
    "The {field} specialist {name} comes from {city}, where {p} was born in {year}. After graduating from "
    "{university}, {p} took a position at {employer}.",
)
QUESTIONS = {
    "city": "Where was {name} born?",
    "year": "In which year was {name} born?",
    "university": "Which university did {name} attend?",
    "employer": "Which organisation does {name} work for?",
    "field": "What field does {name} work in?",
}
QA_TEMPLATE = "Question: {question} Answer: {answer}."
PROMPT_TEMPLATE = "Question: {question} Answer:"


@dataclass(frozen=True)
class Person:
    name: str
    pronoun: str
    city: str
    year: str
    university: str
    employer: str
    field: str

    def fill(self, template: str) -> str:
        return template.format(
            name=self.name,
            P=self.pronoun.capitalize(),
            p=self.pronoun,
            city=self.city,
            year=self.year,
            university=self.university,
            employer=self.employer,
            field=self.field,
        )


MAX_PEOPLE = 40_000


def people(n: int, seed: int) -> list[Person]:
    """n invented people with distinct names; first and last names recur across people, so
    retrieval returns namesakes as distractors."""
    if n > MAX_PEOPLE:
        raise M3Error(f"--people must be at most {MAX_PEOPLE}")
    rng = random.Random(seed)
    first, last = _names(rng, 200, (1, 2)), _names(rng, 250, (2, 3))
    names = rng.sample([f"{f} {l}" for f in first for l in last], n)
    return [
        Person(
            name,
            rng.choice(("he", "she")),
            rng.choice(CITIES),
            rng.choice(ATTRIBUTES["year"]),
            rng.choice(UNIVERSITIES),
            rng.choice(EMPLOYERS),
            rng.choice(FIELDS),
        )
        for name in names
    ]


def qa(person: Person) -> list[dict]:
    return [
        {
            "question": q.format(name=person.name),
            "answer": getattr(person, attr),
            "attribute": attr,
            "chance": round(1 / len(ATTRIBUTES[attr]), 6),
            "title": person.name,
        }
        for attr, q in QUESTIONS.items()
    ]


def namesake_pairs(seen: list[Person], n: int, seed: int) -> list[dict]:
    """n training documents of two question-answer lines about two seen namesakes (people who
    share a first or a last name), one attribute each: the retriever returns both
    people's references for such a chunk, and only the names tell which answer is whose."""
    rng = random.Random(seed + 2)  # its own stream: the other files do not change with n
    groups: dict[str, list[Person]] = {}
    for p in seen:
        first, last = p.name.split(" ", 1)
        groups.setdefault("l " + last, []).append(p)
        groups.setdefault("f " + first, []).append(p)
    keys = sorted(k for k, g in groups.items() if len(g) >= 2)
    if n and not keys:
        raise M3Error("no two seen people share a name: --namesake-pairs needs more --people")
    docs = []
    for j in range(n):
        a, b = rng.sample(groups[rng.choice(keys)], 2)
        lines = [QA_TEMPLATE.format(**rng.choice(qa(p))) for p in (a, b)]
        docs.append({"id": f"{a.name}|{b.name}#pair{j}", "text": " ".join(lines)})
    return docs


def synthesize(
    out: Path,
    n_people: int = 5000,
    seed: int = 0,
    n_unseen: int | None = None,
    overwrite: bool = False,
    n_pairs: int = 0,
    qa_only: bool = False,
) -> dict:
    """Write train.parquet, kb.parquet, qa_seen.jsonl, qa_unseen.jsonl into `out` (atomically).

    Per seen person the training text has a biography with two question-answer lines and a
    document of three question-answer lines alone (the answers must come from weights or
    memory). The knowledge base has one biography per person, seen or unseen, in a wording the
    training text never uses. Unseen people: 10% (at most 500) unless n_unseen is given.
    n_pairs adds that many namesake-pair documents (`namesake_pairs`) to the training text.
    qa_only leaves each biography, with the two question-answer lines attached to it, out of
    the training text (nothing else changes): the three-question documents stay, so until a
    model has seen them their answers are only in kb.parquet and must be read from memory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if n_people < 2:
        raise M3Error("--people must be at least 2")
    folk = people(n_people, seed)
    if n_unseen is None:
        n_unseen = min(500, max(1, n_people // 10))
    if not 1 <= n_unseen < n_people:
        raise M3Error(f"the unseen people must number 1..{n_people - 1}, got {n_unseen}")
    if n_pairs < 0:
        raise M3Error("--namesake-pairs must be >= 0")
    unseen, seen = folk[:n_unseen], folk[n_unseen:]
    rng = random.Random(seed + 1)
    train = []
    for p in seen:
        questions = qa(p)
        rng.shuffle(questions)
        lines = [QA_TEMPLATE.format(**x) for x in questions]
        train.append({"id": f"{p.name}#bio", "text": p.fill(rng.choice(TRAIN_BIOS)) + " " + " ".join(lines[:2])})
        train.append({"id": f"{p.name}#qa", "text": " ".join(lines[2:])})
    rng.shuffle(train)
    if qa_only:
        train = [doc for doc in train if not doc["id"].endswith("#bio")]
    train += namesake_pairs(seen, n_pairs, seed)  # training packs documents in a shuffled order
    kb = [{"id": p.name, "title": p.name, "text": p.fill(rng.choice(KB_BIOS))} for p in folk]
    qa_seen = [x for p in seen for x in qa(p)]
    qa_unseen = [x for p in unseen for x in qa(p)]
    with atomic_dir(out, overwrite=overwrite, replaceable=lambda d: (d / "synth.json").is_file()) as tmp:
        pq.write_table(pa.Table.from_pylist(train), tmp / "train.parquet")
        pq.write_table(pa.Table.from_pylist(kb), tmp / "kb.parquet")
        for name, rows in (("qa_seen.jsonl", qa_seen), ("qa_unseen.jsonl", qa_unseen)):
            (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        info = {
            "people": n_people,
            "seen": len(seen),
            "unseen": len(unseen),
            "seed": seed,
            "namesake_pairs": n_pairs,
            "qa_only": qa_only,
            "train_texts": len(train),
            "kb_texts": len(kb),
            "qa_seen": len(qa_seen),
            "qa_unseen": len(qa_unseen),
            "prompt_template": PROMPT_TEMPLATE,
        }
        (tmp / "synth.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
