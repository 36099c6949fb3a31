"""CTC output units: the symbols the speech stage's CTC head predicts, frame by frame.

- `chars`: blank, space, apostrophe, a-z. Needs no file; any transcript can be spelt.
- `speech_digits_bpe`: subword units fitted with the `tokenizers` library to the training
  transcripts of the embedded spoken-digits corpus and shipped in `herd/assets/tokenizers/`.
  On that corpus every word is one unit, so the head predicts words, not spellings
  (experiments/fusion_recipe, twelfth round: test WER 0.032 against 0.090 with chars).
  Regenerate with `python -m herd.data.ctc_units`.
- a path to a `tokenizer.json` fitted the same way to a user's manifest:
  `python -m herd.data.ctc_units --manifest M --out F` (its training split only).

Subword units keep the 26 letters and the apostrophe as units of their own, so a word never
seen in training is still spelt. Transcripts are normalised before encoding (lower case a-z,
apostrophe, single spaces), and WER compares normalised text, whichever units produced it.
"""

from __future__ import annotations

import argparse
import re
from importlib.resources import files
from pathlib import Path

from herd.errors import ConfigError

BLANK = "<blank>"
ALPHABET = "'abcdefghijklmnopqrstuvwxyz"
BUNDLED = {"speech_digits_bpe": "speech_digits_ctc_bpe.json"}


def normalise_transcript(text: str) -> str:
    """Lower case; characters outside a-z and the apostrophe become spaces; spaces collapsed."""
    text = "".join(ch if ch in ALPHABET else " " for ch in text.lower())
    return re.sub(" +", " ", text).strip()


class CharUnits:
    """Blank (0), space (1), then the alphabet: one unit per character."""

    blank_id = 0
    symbols = (BLANK, " ", *ALPHABET)

    def __init__(self):
        self.index = {ch: i for i, ch in enumerate(self.symbols) if i != self.blank_id}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        return [self.index[ch] for ch in normalise_transcript(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != self.blank_id)


class SubwordUnits:
    """A `tokenizers` BPE over normalised transcripts, with the blank at id 0."""

    blank_id = 0

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        if not path.is_file():
            raise ConfigError(
                f"CTC units file {path} does not exist; use model.ctc_units=chars, "
                f"{' or '.join(BUNDLED)}, or fit one with `python -m herd.data.ctc_units`."
            )
        self.tokenizer = Tokenizer.from_file(str(path))
        if self.tokenizer.token_to_id(BLANK) != self.blank_id:
            raise ConfigError(
                f"CTC units file {path} does not have {BLANK} at id 0; fit it with "
                "`python -m herd.data.ctc_units`."
            )
        # a BPE without an unknown token drops what it cannot spell: refuse such a file
        missing = [ch for ch in ALPHABET if not self.tokenizer.encode(ch).ids]
        if missing:
            raise ConfigError(
                f"CTC units file {path} cannot spell {''.join(missing)!r}; fit it with "
                "`python -m herd.data.ctc_units`, which keeps every letter as a unit."
            )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(normalise_transcript(text)).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)  # the blank is a special token: skipped


def load_ctc_units(spec: str) -> CharUnits | SubwordUnits:
    """`chars`, a bundled name (`speech_digits_bpe`), or a path to a fitted tokenizer.json."""
    if spec == "chars":
        return CharUnits()
    if spec in BUNDLED:
        return SubwordUnits(Path(str(files("herd.assets") / "tokenizers" / BUNDLED[spec])))
    return SubwordUnits(Path(spec))


def fit_subword_units(texts: list[str], vocab_size: int):
    """A BPE over whole words of the normalised texts (a word-start marker, no merges across
    words), every letter kept as a unit, the blank at id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BLANK],
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    tokenizer.train_from_iterator([normalise_transcript(t) for t in texts], trainer=trainer)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    from herd.data.speech import SpeechDataModule  # the data module owns the splits

    parser = argparse.ArgumentParser(
        description="Fit CTC subword units to the training transcripts of a speech manifest "
        "(by default the embedded corpus, rewriting the bundled speech_digits_bpe)."
    )
    parser.add_argument("--manifest", help="a JSONL speech manifest; default: the embedded one")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=256,
        help="at most this many units (fewer when every training word is already one unit)",
    )
    parser.add_argument(
        "--out", default=str(files("herd.assets") / "tokenizers" / BUNDLED["speech_digits_bpe"])
    )
    args = parser.parse_args(argv)
    if args.manifest:
        data = SpeechDataModule(source="manifest", manifest=args.manifest)
    else:
        data = SpeechDataModule(source="digits")
    data.setup("fit")
    texts = [clip.text for clip in data.clips["train"]]  # never fit on val/test transcripts
    tokenizer = fit_subword_units(texts, args.vocab_size)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.get_vocab_size()} units from {len(texts)} transcripts")


if __name__ == "__main__":
    main()
