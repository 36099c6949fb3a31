"""Tokenizers with Llama 3's special tokens.

- `herd_bpe`: a 4096-token byte-level BPE trained with the `tokenizers` library on the
  embedded English corpus and shipped in `herd/assets/tokenizers/` (regenerate with
  `python -m herd.data.tokenizer`).
- `herd_bpe_digits`: the same BPE with every digit a token of its own (as Llama 1 and 2
  split numbers). herd_bpe merges digits by what precedes them (" 58664" is " 5" "8" "6"
  "64"), so a number's tokens are rare and vary; with one token per digit a fusion stage
  trained on pass keys alone copied 0.96 of them after 1600 prompts, against 0.04
  (experiments/fusion_recipe, sixteenth round; in the recipe's mixture it did not yet pay).
- `bytes`: UTF-8 bytes plus the special tokens; needs no file.
- a path to a Hugging Face `tokenizer.json`, to Meta's `tokenizer.model` (tiktoken BPE
  ranks), or to a checkpoint directory holding either.

Every tokenizer carries the Llama 3 chat format's special tokens (the format: herd.data.chat).
"""

from __future__ import annotations

import argparse
from importlib.resources import files
from pathlib import Path

from herd.errors import ConfigError

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
# where an image / a clip's speech embeddings / a video go in a prompt (<|image|> is Llama
# 3.2's)
IMAGE, SPEECH, VIDEO = "<|image|>", "<|speech|>", "<|video|>"
# Llama 3's reserved tokens that herd's formats use, plus herd's speech and video placeholders.
SPECIAL_TOKENS = [BOS, EOS, START_HEADER, END_HEADER, EOT, PAD, IMAGE, SPEECH, VIDEO]
# A released Llama 3 tokenizer has no <|speech|> or <|video|>, and only Llama 3.2 Vision's has
# <|image|>: there they are reserved special tokens, whose rows the released embeddings
# already hold.
RESERVED_FOR = {
    IMAGE: "<|reserved_special_token_10|>",
    SPEECH: "<|reserved_special_token_11|>",
    VIDEO: "<|reserved_special_token_12|>",
}
BUNDLED = {"herd_bpe": "python_docs_bpe_4k.json"}
SPLIT_DIGITS = {"herd_bpe_digits": "herd_bpe"}  # name -> the bundled BPE it splits digits of

# Meta's tokenizer.model: the pre-tokenisation pattern and the layout of the 256 special ids
# that follow the BPE ranks, as published with Llama 3.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL_NAMES = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    "<|eom_id|>",
    EOT,
    "<|python_tag|>",
]


class Tokenizer:
    """Common interface: ids are plain ints, special tokens are addressed by their text."""

    vocab_size: int
    special_ids: dict[str, int]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            special = set(self.special_ids.values())
            ids = [i for i in ids if i not in special]
        return self._decode(ids)

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def eot_id(self) -> int:
        return self.special_ids[EOT]

    @property
    def pad_id(self) -> int:
        return self.special_ids[PAD]

    def header_ids(self, role: str) -> list[int]:
        """<|start_header_id|>{role}<|end_header_id|>\n\n: what opens each turn."""
        special = self.special_ids
        return [
            special[START_HEADER],
            *self._encode(role),
            special[END_HEADER],
            *self._encode("\n\n"),
        ]

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then the special tokens."""

    def __init__(self) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    def _encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library."""

    def __init__(self, path: str | Path, split_digits: bool = False) -> None:
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import pre_tokenizers

        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"Tokenizer file {path} does not exist; use tokenizer=herd_bpe or bytes."
            )
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust error names no file
            raise ConfigError(f"Tokenizer file {path} could not be read: {exc}") from exc
        if split_digits:  # digits are cut apart before the BPE's own pre-tokenisation
            digits = pre_tokenizers.Digits(individual_digits=True)
            self._tok.pre_tokenizer = pre_tokenizers.Sequence([digits, self._tok.pre_tokenizer])
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        missing = [t for t in (BOS, EOS) if t not in vocab]
        if missing:
            raise ConfigError(f"Tokenizer {path} lacks the special token(s) {missing}.")
        self.special_ids = {t: vocab[t] for t in SPECIAL_TOKENS if t in vocab}
        for token, reserved in RESERVED_FOR.items():
            if token not in self.special_ids and reserved in vocab:
                self.special_ids[token] = vocab[reserved]
        if PAD not in self.special_ids:  # Llama 3 pads with a reserved token; fall back to eos
            self.special_ids[PAD] = vocab[EOS]

    def _encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class TiktokenTokenizer(Tokenizer):
    """Meta's `tokenizer.model` (base64 token, rank per line) run by tiktoken, with Llama 3's
    256 special ids after the ranks."""

    def __init__(self, path: str | Path) -> None:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as exc:  # binascii/ValueError for a file that is not BPE ranks
            raise ConfigError(f"Tokenizer file {path} is not a tiktoken BPE file: {exc}") from exc
        n = len(ranks)
        names = LLAMA3_SPECIAL_NAMES + [
            f"<|reserved_special_token_{i}|>"
            for i in range(3, 3 + LLAMA3_NUM_SPECIAL - len(LLAMA3_SPECIAL_NAMES))
        ]
        self.special_ids = {name: n + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=path.stem,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=dict(self.special_ids),
        )
        for token, reserved in RESERVED_FOR.items():  # markers, never in text to encode
            self.special_ids[token] = self.special_ids[reserved]
        self.vocab_size = n + LLAMA3_NUM_SPECIAL
        self.path = path

    def _encode(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def _decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """`herd_bpe`, `herd_bpe_digits`, `bytes`, a tokenizer.json / tokenizer.model, or a
    directory holding one."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec in BUNDLED or spec in SPLIT_DIGITS:
        name = SPLIT_DIGITS.get(spec, spec)
        path = Path(str(files("herd.assets") / "tokenizers" / BUNDLED[name]))
        return HFTokenizer(path, split_digits=spec in SPLIT_DIGITS)
    path = Path(spec)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise ConfigError(f"Directory {path} holds neither tokenizer.json nor tokenizer.model.")
    if path.suffix == ".model":
        return TiktokenTokenizer(path)
    return HFTokenizer(path)


def train_bpe(texts, vocab_size: int):
    """Train a byte-level BPE (GPT-2/Llama 3 style pre-tokenisation) with the special tokens."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def main() -> None:
    from herd.data.corpus import python_docs_documents, split_documents

    parser = argparse.ArgumentParser(description="Retrain the bundled BPE on the embedded corpus.")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--out", default=str(files("herd.assets") / "tokenizers" / BUNDLED["herd_bpe"])
    )
    args = parser.parse_args()
    train_docs = split_documents(python_docs_documents())["train"]  # never fit on val/test text
    train_bpe(train_docs, args.vocab_size).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
