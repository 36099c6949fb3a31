"""Passkey retrieval and needle-in-a-haystack prompts for long-context evaluation.

A five-digit key is hidden at a relative depth (0 = start, 1 = end) inside filler text of a
given token length, and the model must repeat it after the question. Two fillers:
- `passkey`: the same few sentences repeated (retrieval with no distraction);
- `needle`: held-out English prose (the needle must be found among real text).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from herd.data.tokenizer import Tokenizer

REPEATED_FILLER = "The grass is green. The sky is blue. The sun is bright. Here we go again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeySample:
    tokens: list[int]  # the prompt, ending right before the answer
    answer: str  # the key, as the model should continue: " 12345"
    length: int
    depth: float


def make_passkey_sample(
    tokenizer: Tokenizer,
    length: int,
    depth: float,
    rng: random.Random,
    filler_texts: list[str] | None = None,
) -> PasskeySample:
    """A prompt of exactly `length` tokens (filler trimmed to fit) with the key at `depth`."""
    key = f"{rng.randrange(10_000, 100_000)}"
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    budget = length - len(needle) - len(question) - 1  # -1: <|begin_of_text|>
    if budget < 1:
        raise ValueError(f"A passkey prompt needs more than {length} tokens.")
    filler: list[int] = []
    if filler_texts:
        order = list(range(len(filler_texts)))
        rng.shuffle(order)
        for i in order:
            filler += tokenizer.encode(filler_texts[i].strip() + " ")
            if len(filler) >= budget:
                break
        while len(filler) < budget:  # a short corpus repeats
            filler += filler
    else:
        chunk = tokenizer.encode(REPEATED_FILLER)
        filler = chunk * (budget // len(chunk) + 1)
    filler = filler[:budget]
    cut = round(depth * len(filler))
    tokens = [tokenizer.bos_id, *filler[:cut], *needle, *filler[cut:], *question]
    return PasskeySample(tokens=tokens, answer=" " + key, length=length, depth=depth)


def passkey_training_texts(n: int, rng: random.Random, max_filler_repeats: int = 12) -> list[str]:
    """Documents that teach the retrieval format: a key in repeated filler, the question, and the
    answer. Mixed into language data for long-context training.

    A document holds 0 .. max_filler_repeats - 1 copies of REPEATED_FILLER, some before the key
    and the rest (the distance to the question) after it. Half the documents are short: the count
    is log-uniform (one more than it is) and split at a random point, giving many retrieval
    examples per training token, which is how copying is learnt. In the other half the distance
    is uniform up to the longest, so keys a full row back are common too (with short documents
    alone, keys 300+ tokens back were 2% of the examples and seldom retrieved)."""
    docs = []
    for i in range(n):
        key = f"{rng.randrange(10_000, 100_000)}"
        if i % 2:  # distance first, then filler before the key in the room left
            after = rng.randrange(max_filler_repeats)
            before = rng.randrange(max_filler_repeats - after)
        else:
            repeats = int((max_filler_repeats + 1) ** rng.random()) - 1
            before = rng.randint(0, repeats)
            after = repeats - before
        docs.append(
            REPEATED_FILLER * before
            + NEEDLE.format(key=key)
            + REPEATED_FILLER * after
            + f"{QUESTION} {key}."
        )
    return docs
