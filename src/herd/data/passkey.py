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
# A chat answer (fusion and review tasks) repeats the needle's words around the key. The
# bundled BPE merges a leading space into the first digit and splits digits by what precedes
# them ("12345" alone is "1234" "5"; after a space " 1" "2" "34" "5"), so a bare key's tokens
# are not the document's and the answer could not be copied from it token for token.
CHAT_ANSWER = "The pass key is {key}."


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
    budget = length - _prompt_overhead(tokenizer, key)
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
        filler = _repeated_filler(tokenizer, budget)
    filler = filler[:budget]
    cut = round(depth * len(filler))
    tokens = _prompt(tokenizer, key, filler[:cut], filler[cut:])
    return PasskeySample(tokens=tokens, answer=" " + key, length=length, depth=depth)


def _prompt_overhead(tokenizer: Tokenizer, key: str) -> int:
    """Tokens of a prompt other than filler."""
    return len(_prompt(tokenizer, key, [], []))


def _repeated_filler(tokenizer: Tokenizer, n: int) -> list[int]:
    chunk = tokenizer.encode(REPEATED_FILLER)
    return (chunk * (n // len(chunk) + 1))[:n]


def _prompt(tokenizer: Tokenizer, key: str, before: list[int], after: list[int]) -> list[int]:
    needle = tokenizer.encode(NEEDLE.format(key=key))
    return [tokenizer.bos_id, *before, *needle, *after, *tokenizer.encode(QUESTION)]


def passkey_training_documents(
    tokenizer: Tokenizer, n: int, rng: random.Random, seq_len: int
) -> list[list[int]]:
    """Documents that teach retrieval, mixed into language data for long-context training: a
    prompt built as the evaluation builds it (the key can sit at any token of the filler, even
    mid-sentence), then the answer and <|end_of_text|>. The longest fill a row of `seq_len`, so
    a full-length prompt's key is no further back than trained ones.

    Half the documents are short: the filler length (plus one copy of REPEATED_FILLER) is
    log-uniform and split at a random token, giving many retrieval examples per training token,
    which is how copying is learnt. In the other half the key-to-question distance is uniform
    up to the longest, so keys a full row back are common too (with short documents alone,
    keys 300+ tokens back were 2% of the examples and seldom retrieved)."""
    copy = len(tokenizer.encode(REPEATED_FILLER))  # tokens
    copies_per_row = 1 + seq_len / copy  # the log-uniform range, in copies, is [1, this)
    docs = []
    for i in range(n):
        key = f"{rng.randrange(10_000, 100_000)}"
        answer = tokenizer.encode(f" {key}.")
        # filler tokens that still leave room for the answer and <|end_of_text|>
        longest = seq_len - _prompt_overhead(tokenizer, key) - len(answer) - 1
        if longest < 0:
            raise ValueError(f"A passkey training document needs more than {seq_len} tokens.")
        if i % 2:  # distance first, then filler before the key in the room left
            after = rng.randint(0, longest)
            before = rng.randint(0, longest - after)
        else:
            total = min(longest, int(copies_per_row ** rng.random() * copy) - copy)
            before = rng.randint(0, total)
            after = total - before
        filler = _repeated_filler(tokenizer, before + after)
        prompt = _prompt(tokenizer, key, filler[:before], filler[before:])
        docs.append([*prompt, *answer, tokenizer.eos_id])
    return docs
