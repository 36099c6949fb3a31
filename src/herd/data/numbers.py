"""Number phrases in English and German: the shared text of the embedded "digits" world.

The same phrases are spoken (the speech corpus), recognised (CTC on English characters) and
translated (English -> German, scored with BLEU), so every phrase has at least four words
in both languages: a sentence with fewer words has no 4-grams and scores 0 BLEU on its own.
Everything is lower case without punctuation; English uses only a-z, space and apostrophe,
which keeps a character-level CTC vocabulary small.

    make_phrases(3, seed=0)  -> [Phrase(english="three one four nine",
                                         german="drei eins vier neun", kind="digits"), ...]
    number_to_english(42)    -> "forty two"
    number_to_german(42)     -> "zweiundvierzig"

Pure Python and deterministic: the same (n, seed) gives the same phrases on any machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from herd.data.splits import hash_split

MIN_WORDS = 4  # BLEU's longest n-gram
# Held-out phrases, by a hash of the English: the same in every stage, task and seed.
PHRASE_VAL_FRACTION = PHRASE_TEST_FRACTION = 0.1
# The English -> German instruction, worded alike wherever a model reads it.
TRANSLATE_PROMPT = "translate into german: {text}"
# A numbered passage and the question that asks for it by number, worded alike in the
# language stage's lookup documents and in the review documents (herd.data.reviews).
PASSAGE = "passage {number}: {text}."
PASSAGE_QUESTION = "translate passage {number} into german."
ENGLISH_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz' ")

# ----------------------------------------------------------------------------- numbers

ENGLISH_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen",
]  # fmt: skip
ENGLISH_TENS = [
    "", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
]  # fmt: skip

GERMAN_ONES = [
    "null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
    "zehn", "elf", "zwölf", "dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn",
    "achtzehn", "neunzehn",
]  # fmt: skip
GERMAN_TENS = [
    "", "", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig",
    "neunzig",
]  # fmt: skip

MAX_NUMBER = 999_999


def _check_range(n: int) -> None:
    if not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"numbers from 0 to {MAX_NUMBER} are supported, got {n!r}")


def number_to_english(n: int) -> str:
    """0..999999 in words, American style without "and": 1999 -> "one thousand nine hundred
    ninety nine", 42 -> "forty two" (no hyphen, so words are space-separated tokens)."""
    _check_range(n)
    if n < 20:
        return ENGLISH_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return ENGLISH_TENS[tens] + (f" {ENGLISH_ONES[ones]}" if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = f"{ENGLISH_ONES[hundreds]} hundred"
        return head + (f" {number_to_english(rest)}" if rest else "")
    thousands, rest = divmod(n, 1000)
    head = f"{number_to_english(thousands)} thousand"
    return head + (f" {number_to_english(rest)}" if rest else "")


def _german_below_thousand(n: int) -> str:
    """1..999 as it appears inside a compound: "ein" (not "eins") before a suffix."""
    if n < 100:
        if n < 20:
            return "ein" if n == 1 else GERMAN_ONES[n]
        tens, ones = divmod(n, 10)
        if not ones:
            return GERMAN_TENS[tens]
        unit = "ein" if ones == 1 else GERMAN_ONES[ones]  # einundzwanzig
        return f"{unit}und{GERMAN_TENS[tens]}"
    hundreds, rest = divmod(n, 100)
    head = ("ein" if hundreds == 1 else GERMAN_ONES[hundreds]) + "hundert"
    return head + (_german_below_thousand(rest) if rest else "")


def number_to_german(n: int) -> str:
    """0..999999 as one German word: 42 -> "zweiundvierzig", 1999 ->
    "eintausendneunhundertneunundneunzig", 101 -> "einhunderteins", 1 -> "eins"."""
    _check_range(n)
    if n == 0:
        return "null"
    thousands, rest = divmod(n, 1000)
    word = ""
    if thousands:
        word = ("ein" if thousands == 1 else _german_below_thousand(thousands)) + "tausend"
    if rest:
        word += _german_below_thousand(rest)
    if n % 100 == 1:
        word += "s"  # a final one is "eins": hunderteins (but einhundert, einundzwanzig)
    return word


def digits_to_english(digits: str) -> str:
    """ "3149" -> "three one four nine" (each digit a word, as a code is read aloud)."""
    return " ".join(ENGLISH_ONES[int(d)] for d in digits)


def digits_to_german(digits: str) -> str:
    return " ".join(GERMAN_ONES[int(d)] for d in digits)


# ----------------------------------------------------------------------------- phrases


@dataclass(frozen=True)
class Phrase:
    english: str
    german: str
    kind: str  # the template that made it: digits, code, objects, there_are, age, call


# (English singular is never needed: counts start at 2.) German plural, gender-free in the
# plural, so adjectives take the strong plural ending -e ("rote äpfel").
OBJECTS = [
    ("apples", "äpfel"),
    ("books", "bücher"),
    ("cats", "katzen"),
    ("dogs", "hunde"),
    ("cars", "autos"),
    ("birds", "vögel"),
    ("cups", "tassen"),
    ("chairs", "stühle"),
]
COLOURS = [
    ("red", "rote"),
    ("blue", "blaue"),
    ("green", "grüne"),
    ("black", "schwarze"),
    ("white", "weiße"),
    ("small", "kleine"),
]
CODE_NOUNS = [
    ("code", "der code"),
    ("number", "die nummer"),
    ("pin", "die pin"),
    ("room", "das zimmer"),
]


def _digit_string(rng: random.Random, low: int, high: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(rng.randint(low, high)))


def _digits(rng: random.Random) -> Phrase:
    digits = _digit_string(rng, 4, 7)
    return Phrase(digits_to_english(digits), digits_to_german(digits), "digits")


def _code(rng: random.Random) -> Phrase:
    noun, german_noun = rng.choice(CODE_NOUNS)
    digits = _digit_string(rng, 3, 5)
    return Phrase(
        f"the {noun} is {digits_to_english(digits)}",
        f"{german_noun} ist {digits_to_german(digits)}",
        "code",
    )


def _objects(rng: random.Random) -> Phrase:
    count = rng.randint(2, 99)
    (noun, german_noun), (colour, german_colour) = rng.choice(OBJECTS), rng.choice(COLOURS)
    subject, german_subject = rng.choice(
        [("i have", "ich habe"), ("we have", "wir haben"), ("we need", "wir brauchen")]
    )
    return Phrase(
        f"{subject} {number_to_english(count)} {colour} {noun}",
        f"{german_subject} {number_to_german(count)} {german_colour} {german_noun}",
        "objects",
    )


def _there_are(rng: random.Random) -> Phrase:
    count = rng.randint(2, 999) if rng.random() < 0.3 else rng.randint(2, 99)
    noun, german_noun = rng.choice(OBJECTS)
    return Phrase(
        f"there are {number_to_english(count)} {noun}",
        f"es gibt {number_to_german(count)} {german_noun}",
        "there_are",
    )


def _age(rng: random.Random) -> Phrase:
    age = rng.randint(2, 99)
    person, german_person = rng.choice([("she", "sie"), ("he", "er")])
    return Phrase(
        f"{person} is {number_to_english(age)} years old",
        f"{german_person} ist {number_to_german(age)} jahre alt",
        "age",
    )


def _call(rng: random.Random) -> Phrase:
    digits = _digit_string(rng, 3, 4)
    return Phrase(
        f"please call {digits_to_english(digits)}",
        f"bitte {digits_to_german(digits)} anrufen",
        "call",
    )


# (template, weight): digit strings dominate, as in the spoken-digits tradition
TEMPLATES = [
    (_digits, 4),
    (_code, 2),
    (_objects, 2),
    (_there_are, 1),
    (_age, 1),
    (_call, 1),
]


def make_phrases(n: int, seed: int = 0) -> list[Phrase]:
    """`n` distinct phrases from the templates, deterministic in `seed`."""
    rng = random.Random(seed)
    templates, weights = zip(*TEMPLATES, strict=True)
    phrases: list[Phrase] = []
    seen: set[str] = set()
    attempts = 0
    while len(phrases) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not make {n} distinct phrases")
        phrase = rng.choices(templates, weights)[0](rng)
        if phrase.english in seen:
            continue
        if min(len(phrase.english.split()), len(phrase.german.split())) < MIN_WORDS:
            continue  # e.g. "please call" with three digits in German: still >= 4 words
        seen.add(phrase.english)
        phrases.append(phrase)
    return phrases


def phrases_of_split(n: int, seed: int, split: str) -> list[Phrase]:
    """The phrases of `make_phrases(n, seed)` that fall in `split`."""
    return [
        p
        for p in make_phrases(n, seed=seed)
        if hash_split(p.english, PHRASE_VAL_FRACTION, PHRASE_TEST_FRACTION) == split
    ]


def translation_documents(n_docs: int, seed: int, pairs_per_doc: int = 8) -> list[str]:
    """Plain-text documents of English -> German instructions and their answers, from the
    training phrases only: mixed into the language stage, they train the number words of both
    languages before the fusion stage asks for them."""
    pool = phrases_of_split(max(64, 2 * n_docs * pairs_per_doc), seed, "train")
    rng = random.Random(seed)
    return [
        "\n".join(
            f"{TRANSLATE_PROMPT.format(text=p.english)}\n{p.german}"
            for p in rng.sample(pool, min(pairs_per_doc, len(pool)))
        )
        for _ in range(n_docs)
    ]


def passage_lookup_documents(
    n_docs: int, seed: int, passages_per_doc: tuple[int, int] = (2, 6)
) -> list[str]:
    """Plain-text documents of numbered English passages, then a question for each passage
    in shuffled order, answered by its German (training phrases only): finding a passage
    by its number and translating it is what the review documents' translation questions
    ask, practised on text in the language stage."""
    lo, hi = passages_per_doc
    pool = phrases_of_split(max(64, 2 * n_docs * hi), seed, "train")
    rng = random.Random(seed + 1)  # other draws than translation_documents(n, seed)
    docs = []
    for _ in range(n_docs):
        passages = rng.sample(pool, rng.randint(lo, hi))
        lines = [PASSAGE.format(number=k + 1, text=p.english) for k, p in enumerate(passages)]
        for k in rng.sample(range(len(passages)), len(passages)):
            lines += [PASSAGE_QUESTION.format(number=k + 1), passages[k].german]
        docs.append("\n".join(lines))
    return docs


__all__ = [
    "ENGLISH_CHARACTERS",
    "MIN_WORDS",
    "PASSAGE",
    "PASSAGE_QUESTION",
    "PHRASE_TEST_FRACTION",
    "PHRASE_VAL_FRACTION",
    "Phrase",
    "TRANSLATE_PROMPT",
    "digits_to_english",
    "digits_to_german",
    "make_phrases",
    "number_to_english",
    "number_to_german",
    "passage_lookup_documents",
    "phrases_of_split",
    "translation_documents",
]
