"""Fresh people for a continual-training experiment whose names are those of the proof's task.

`m3 synth OUT --people N --seed S --qa-only` with S != 0 draws new name pools, whose names the
proof model's tokenizer splits into several tokens, unlike the proof's own names (one token
each). This writes the same files as that command, but its people combine the first and last
names of `m3 synth --seed 0` (the proof's pools), leaving out the proof's 2,000 people, so
questions about them look exactly like the proof's and their facts exist only in the bank.

    python research/fresh_people.py /tmp/exp/d 6000 11
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import m3cli.synth as s  # noqa: E402


def main() -> None:
    if len(sys.argv) != 4:
        raise SystemExit("usage: fresh_people.py OUT_DIR PEOPLE SEED")
    out, n, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng0 = random.Random(0)  # the draws people(…, 0) makes first: its name pools
    first, last = s._names(rng0, 200, (1, 2)), s._names(rng0, 250, (2, 3))
    proof = {p.name for p in s.people(2000, 0)}

    def people(k: int, sd: int) -> list:
        rng = random.Random(sd)
        names = rng.sample(sorted(f"{f} {la}" for f in first for la in last if f"{f} {la}" not in proof), k)
        return [s.Person(name, rng.choice(("he", "she")), rng.choice(s.CITIES), rng.choice(s.ATTRIBUTES["year"]),
                         rng.choice(s.UNIVERSITIES), rng.choice(s.EMPLOYERS), rng.choice(s.FIELDS)) for name in names]

    s.people = people
    print(s.synthesize(out, n, seed=seed, qa_only=True, overwrite=True))


if __name__ == "__main__":
    main()
