"""Tokenizers, packing, the embedded corpora and manifests."""

from __future__ import annotations

import json
import re

import pytest
import torch

from herd.data.chat import encode_chat
from herd.data.corpus import pydoc_documents, read_text_manifest, split_documents
from herd.data.digits_tasks import translation_examples
from herd.data.numbers import translation_documents
from herd.data.packing import pack_documents
from herd.data.splits import hash_split
from herd.data.text import TextDataModule
from herd.data.tokenizer import BOS, EOS, ByteTokenizer, load_tokenizer
from herd.errors import ConfigError, DataError
from herd.systems.losses import IGNORE_INDEX


@pytest.mark.parametrize("spec", ["herd_bpe", "herd_bpe_digits", "bytes"])
def test_tokenizers_round_trip_text_and_expose_llama3_specials(spec):
    tok = load_tokenizer(spec)
    text = 'The "with" statement wraps a block — naïve café ✓'
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert {BOS, EOS, "<|eot_id|>", "<|start_header_id|>", "<|image|>"} <= set(tok.special_ids)
    assert max(tok.special_ids.values()) < tok.vocab_size


def test_bundled_bpe_compresses_english_prose():
    tok = load_tokenizer("herd_bpe")
    text = " ".join(pydoc_documents()[:50])
    assert tok.vocab_size == 4096 + 1  # 4096 BPE tokens and <|video|>, added after them
    assert len(text) / len(tok.encode(text)) > 3.0  # bytes give 1.0


def test_herd_bpe_digits_gives_every_digit_a_token_and_changes_nothing_else():
    """The same BPE and ids; only a number's tokens change: one per digit, the same ten
    whatever precedes them (herd_bpe merges " 58664" into " 5" "8" "6" "64")."""
    plain, digits = load_tokenizer("herd_bpe"), load_tokenizer("herd_bpe_digits")
    assert digits.vocab_size == plain.vocab_size and digits.special_ids == plain.special_ids
    prose = " ".join(pydoc_documents()[:5])
    prose = re.sub(r"[0-9]", "", prose)
    assert digits.encode(prose) == plain.encode(prose)
    for text in ("The pass key is 58664.", "In 2024, 12.5% of 100"):
        ids = digits.encode(text)
        assert digits.decode(ids) == text
        number_pieces = [digits.decode([i]) for i in ids if digits.decode([i]).strip().isdigit()]
        assert number_pieces == [ch for ch in text if ch.isdigit()]
    assert len(plain.encode(" 58664")) < len(digits.encode(" 58664")) == 6  # " " and 5 digits


def test_missing_tokenizer_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_packing_keeps_documents_apart():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]  # stream of 9 tokens
    rows = pack_documents(docs, seq_len=4, pad_id=0)
    assert rows["input_ids"].tolist() == [[10, 11, 12, 20], [21, 30, 31, 32]]
    # next-token labels, ignored where the next token belongs to another document
    assert rows["labels"].tolist() == [[11, 12, IGNORE_INDEX, 21], [IGNORE_INDEX, 31, 32, 33]]
    assert rows["doc_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 1]]


def test_packing_pads_the_last_row():
    rows = pack_documents([[1, 2, 3, 4, 5, 6]], seq_len=4, pad_id=99)
    assert rows["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 99, 99]]
    assert rows["labels"].tolist() == [[2, 3, 4, 5], [6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert rows["doc_ids"][1].tolist() == [0, 0, -1, -1]


def test_packing_whole_documents_never_straddles_a_row():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40, 41, 42, 43, 44, 45]]
    rows = pack_documents(docs, seq_len=4, pad_id=0, whole_documents=True)
    assert rows["input_ids"].tolist() == [
        [10, 11, 12, 0],
        [20, 21, 0, 0],
        [30, 31, 32, 33],
        [40, 41, 42, 43],  # longer than a row: split as before
        [44, 45, 0, 0],
    ]
    assert rows["labels"].tolist()[0] == [11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert rows["labels"].tolist()[2] == [31, 32, 33, IGNORE_INDEX]
    assert rows["doc_ids"].tolist()[1] == [0, 0, -1, -1]


def test_split_is_deterministic_and_disjoint():
    docs = pydoc_documents()
    a, b = split_documents(docs), split_documents(list(docs))
    assert a == b
    assert not set(a["train"]) & set(a["val"]) and not set(a["train"]) & set(a["test"])
    assert len(a["val"]) > 20 and len(a["test"]) > 20


def test_datamodule_rows_and_unigram_reference():
    dm = TextDataModule(tokenizer="herd_bpe", seq_len=128, batch_size=4, source="pydoc")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["doc_ids"].shape == (4, 128)
    # the unigram model of this corpus costs ~6 nats/token: the floor a trained LM must beat
    assert 5.0 < dm.unigram_loss("val") < 7.5


def write_manifest(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_datamodule_trains_on_user_text(tmp_path):
    texts = [
        json.dumps({"text": f"Document number {i} says something about lists and loops."})
        for i in range(60)
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", texts)
    dm = TextDataModule(
        tokenizer="bytes",
        seq_len=64,
        batch_size=2,
        source="manifest",
        manifest=str(manifest),
        val_fraction=0.2,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) > 0 and len(dm.datasets["val"]) > 0
    assert isinstance(dm.tokenizer, ByteTokenizer)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "Expecting property name"),
        ('["a list"]', "expected a JSON object"),
        ('{"txt": "typo"}', 'missing a string "text" field'),
        ('{"text": "   "}', '"text" is empty'),
    ],
)
def test_bad_manifest_lines_name_file_and_line(tmp_path, line, reason):
    manifest = write_manifest(
        tmp_path / "bad.jsonl", ['{"text": "fine"}', line, '{"text": "also fine"}']
    )
    with pytest.raises(DataError, match=f"bad.jsonl, line 2: {re.escape(reason)}"):
        read_text_manifest(manifest)
    assert read_text_manifest(manifest, skip_bad=True) == ["fine", "also fine"]


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        read_text_manifest(tmp_path / "missing.jsonl")


def test_sample_prompts_come_from_held_out_documents():
    dm = TextDataModule(tokenizer="herd_bpe", seq_len=128, source="pydoc")
    dm.setup("fit")
    prompts = dm.sample_prompts(3, 8)
    assert len(prompts) == 3 and all(len(p) == 8 and p[0] == dm.tokenizer.bos_id for p in prompts)
    assert all(isinstance(t, int) for t in prompts[0])
    assert torch.is_tensor(dm.datasets["val"][0]["input_ids"])


def write_tiktoken_model(path):
    """A small tokenizer.model in Meta's format: all bytes plus merges for 'th' and 'the'."""
    import base64

    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the"]
    path.write_text(
        "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(ranks))
    )
    return path


def test_meta_tokenizer_model_with_llama3_special_ids(tmp_path):
    tok = load_tokenizer(str(write_tiktoken_model(tmp_path / "tokenizer.model")))
    assert tok.vocab_size == 258 + 256
    # Llama 3's layout after the BPE ranks (128000 + k in the release)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eot_id) == (258, 259, 262, 267)
    assert tok.special_ids["<|start_header_id|>"] == 264
    assert tok.encode("the") == [257]
    text = "the other theme"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a directory works too


@pytest.mark.parametrize("spec", ["herd_bpe", "bytes"])
def test_llama3_chat_format(spec):
    tok = load_tokenizer(spec)
    ids = encode_chat(
        [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}], tok
    )
    s = tok.special_ids
    assert ids[0] == tok.bos_id
    assert ids.count(s["<|start_header_id|>"]) == 3 and ids.count(tok.eot_id) == 2
    assert ids[-len(tok.encode("\n\n")) - 1] == s["<|end_header_id|>"]
    assert tok.decode(ids) == "system\n\nBe brief.user\n\nHiassistant\n\n"


def test_corrupt_tokenizer_model_is_named(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("not base64 at all\n")
    with pytest.raises(ConfigError, match="tokenizer.model is not a tiktoken BPE file"):
        load_tokenizer(str(bad))


@pytest.mark.parametrize(
    "extra, marker",
    [
        ({"passkey_docs": 50}, "What is the pass key? The pass key is"),
        ({"number_docs": 30}, "translate into german: "),
        ({"lookup_docs": 30}, "into german.\n"),
    ],
)
def test_extra_documents_join_the_training_split_only(extra, marker):
    plain = TextDataModule(tokenizer="herd_bpe", seq_len=256, source="pydoc")
    mixed = TextDataModule(tokenizer="herd_bpe", seq_len=256, source="pydoc", **extra)
    plain.setup("fit")
    mixed.setup("fit")
    added = next(iter(extra.values()))
    assert len(mixed.documents["train"]) == len(plain.documents["train"]) + added
    assert mixed.documents["val"] == plain.documents["val"]
    assert mixed.documents["test"] == plain.documents["test"]
    assert marker in mixed.tokenizer.decode(mixed.documents["train"][-1])


def test_number_documents_hold_training_phrases_only():
    """The language stage's number-phrase documents never show a phrase the fusion stage
    holds out (its translation val/test split)."""
    held_out = {
        ex.prompt
        for split in ("val", "test")
        for ex in translation_examples(6000, seed=0, split=split)
    }
    docs = translation_documents(200, seed=0)
    lines = [line for doc in docs for line in doc.splitlines()]
    prompts, german = lines[0::2], lines[1::2]
    assert len(docs) == 200 and len(lines) == 200 * 8 * 2
    assert all(p.startswith("translate into german: ") for p in prompts)
    assert held_out and not held_out & set(prompts)
    assert all(g and g == g.lower() for g in german)


def test_hash_split_gives_the_asked_fractions():
    splits = [hash_split(f"phrase {i}", 0.1, 0.2) for i in range(20_000)]
    assert splits.count("test") / len(splits) == pytest.approx(0.2, abs=0.02)
    assert splits.count("val") / len(splits) == pytest.approx(0.1, abs=0.02)
    assert hash_split("phrase 7", 0.1, 0.2) == splits[7]


def test_undecodable_manifest_line_is_named_or_skipped(tmp_path):
    manifest = tmp_path / "latin1.jsonl"
    manifest.write_bytes(
        '\ufeff{"text": "first"}\n'.encode() + b'{"text": "caf\xe9"}\n' + b'{"text": "third"}\n'
    )
    with pytest.raises(DataError, match="latin1.jsonl, line 2: 'utf-8' codec can't decode"):
        read_text_manifest(manifest)
    assert read_text_manifest(manifest, skip_bad=True) == [
        "first",
        "third",
    ]  # BOM on line 1 is fine


def test_too_little_training_data_for_one_batch_is_refused(tmp_path):
    manifest = write_manifest(
        tmp_path / "tiny.jsonl", [json.dumps({"text": f"short text {i}"}) for i in range(30)]
    )
    dm = TextDataModule(
        tokenizer="bytes", seq_len=512, batch_size=8, source="manifest", manifest=str(manifest)
    )
    with pytest.raises(ConfigError, match="fewer than data.batch_size=8"):
        dm.setup("fit")


def test_training_passkey_prompts_can_be_shorter_than_the_test_ones():
    """data.passkey_filler_repeats bounds the training prompts' filler; the held-out prompts
    keep theirs, so the metric stays comparable."""
    from herd.data.digits_tasks import passkey_examples
    from herd.data.multimodal import FusionDataModule
    from herd.data.passkey import REPEATED_FILLER

    data = FusionDataModule(weights={"passkey": 1.0}, passkey_train=50, passkey_filler_repeats=1)
    train, test = data._examples("train")["passkey"], data._examples("test")["passkey"]
    assert all(REPEATED_FILLER not in ex.prompt for ex in train)
    assert any(ex.prompt.count(REPEATED_FILLER) >= 4 for ex in test)
    assert [ex.prompt for ex in test] == [ex.prompt for ex in passkey_examples(200, 42 + 2)]


def test_a_lead_in_curriculum_serves_its_own_mixture_first_then_the_mixture():
    from herd.data.chat_module import ChatInputSpec
    from herd.data.multimodal import FusionDataModule

    spec = ChatInputSpec(load_tokenizer("herd_bpe"), None, None, 32, 1)
    weights = {"image": 1.0, "mt": 1.0, "passkey": 0.5}
    plain = FusionDataModule(weights=weights, train_size=200, batch_size=4, passkey_train=40)
    plain.setup_for(spec)
    plain.setup("fit")
    curriculum = FusionDataModule(
        weights=weights,
        train_size=200,
        batch_size=4,
        passkey_train=40,
        lead_in_weights={"image": 0, "mt": 0},
        lead_in_steps=3,
    )
    curriculum.setup_for(spec)
    curriculum.setup("fit")
    batches = [b for b, _ in zip(curriculum.train_dataloader(), range(5), strict=False)]
    assert [set(b["task"]) for b in batches[:3]] == [{"passkey"}] * 3
    expected = [b for b, _ in zip(plain.train_dataloader(), range(2), strict=False)]
    assert [b["task"] for b in batches[3:]] == [b["task"] for b in expected]
    assert curriculum.answer_tokens_per_batch == plain.answer_tokens_per_batch
    mixed = FusionDataModule(
        weights=weights,
        train_size=200,
        batch_size=4,
        passkey_train=40,
        lead_in_weights={"passkey": 8.0},
        lead_in_steps=20,
    )
    mixed.setup_for(spec)
    mixed.setup("fit")
    lead = [t for b, _ in zip(mixed.train_dataloader(), range(20), strict=False) for t in b["task"]]
    assert 0.7 < lead.count("passkey") / len(lead) < 0.9  # 8 / (1 + 1 + 8)
    assert {"image", "mt"} <= set(lead)
    for bad, match in (
        ({"pass": 1.0}, "lead_in_weights=.* must name training tasks"),
        ({"image": 0, "mt": 0, "passkey": 0}, "leave no training task with weight > 0"),
    ):
        typo = FusionDataModule(
            weights=weights, train_size=200, lead_in_weights=bad, lead_in_steps=3
        )
        typo.setup_for(spec)
        with pytest.raises(ConfigError, match=match):
            typo.setup("fit")


def test_silence_pad_puts_silence_around_each_training_clip_and_counts_its_placeholders():
    """data.silence_pad: up to that many seconds of zeros before and after a clip, drawn per
    access from the sample's place in the stream (so a resumed run draws the same)."""
    from herd.data.audio import SAMPLE_RATE
    from herd.data.chat import Example
    from herd.data.multimodal import ExampleDataset, FusionDataModule
    from herd.data.tokenizer import SPEECH

    tokenizer = load_tokenizer("herd_bpe")
    clip = torch.linspace(0.1, 0.9, SAMPLE_RATE)  # 1 s, no zero inside
    examples = [Example("asr", f"{SPEECH}transcribe the audio.", "one", audio=(clip,))] * 40
    speech_tokens = lambda samples: samples // 1280  # noqa: E731 (one per 80 ms)
    speech_id = tokenizer.special_ids[SPEECH]
    padded = ExampleDataset(examples, tokenizer, speech_tokens, seed=3, silence_pad=0.25)
    befores, afters = [], []
    for i in range(len(examples)):
        audio = padded[i]["audio"][0]
        start = int((audio != 0).nonzero()[0])
        befores.append(start / SAMPLE_RATE)
        afters.append((len(audio) - start - len(clip)) / SAMPLE_RATE)
        assert torch.equal(audio[start : start + len(clip)], clip)
        assert padded[i]["input_ids"].count(speech_id) == speech_tokens(len(audio))
    assert 0 <= min(befores + afters) and max(befores + afters) <= 0.25
    assert max(befores) > 0.15 and max(afters) > 0.15 and len(set(befores)) > 30
    again = ExampleDataset(examples, tokenizer, speech_tokens, seed=3, silence_pad=0.25)
    assert torch.equal(again[7]["audio"][0], padded[7]["audio"][0])
    plain = ExampleDataset(examples, tokenizer, speech_tokens, seed=3)
    assert torch.equal(plain[7]["audio"][0], clip)
    with pytest.raises(ConfigError, match="silence_pad must be >= 0"):
        FusionDataModule(silence_pad=-0.1)


def test_repeated_word_copies_draw_clips_that_say_a_word_twice_more_often():
    """data.repeated_word_copies: a training clip whose transcript says a word twice in a row
    enters its speech tasks' pools that many times; validation and test keep each clip once."""
    from herd.data.digits_tasks import says_a_word_twice
    from herd.data.multimodal import FusionDataModule

    assert says_a_word_twice("the pin is eight eight zero")
    assert not says_a_word_twice("eight zero eight")
    weights = {"asr": 1.0, "st": 1.0}
    once = FusionDataModule(weights=weights)
    thrice = FusionDataModule(weights=weights, repeated_word_copies=3)
    for split in ("train", "val", "test"):
        pools, copied = once._examples(split), thrice._examples(split)
        for task in weights:
            twice = sum(says_a_word_twice(ex.transcripts[0]) for ex in pools[task])
            assert twice > 0
            extra = 2 * twice if split == "train" else 0
            assert len(copied[task]) == len(pools[task]) + extra
    with pytest.raises(ConfigError, match="repeated_word_copies must be >= 1"):
        FusionDataModule(repeated_word_copies=0)


def test_passkey_answers_repeat_the_documents_key_tokens():
    """The answer's key is the same token run as the key in the prompt (the bundled BPE
    tokenizes a bare "12345" as "1234" "5" but " 12345" as " 1" "2" "34" "5"), so the answer
    can be copied from the document; the key itself is still what is scored."""
    for spec in ("herd_bpe", "herd_bpe_digits"):
        _assert_answers_repeat_the_keys_tokens(load_tokenizer(spec))


def _assert_answers_repeat_the_keys_tokens(tokenizer) -> None:
    from herd.data.chat import encode_example
    from herd.data.digits_tasks import passkey_examples

    for example in passkey_examples(50, seed=3):
        key = re.search(r"is (\d{5})\.", example.prompt).group(1)
        assert example.answer == f"The pass key is {key}."
        encoded = encode_example(example, tokenizer)
        ids, split = encoded["input_ids"], encoded["prompt_len"]
        key_ids = tokenizer.encode(f" {key}")
        assert _contains(ids[:split], key_ids) and _contains(ids[split:], key_ids)


def test_train_on_prompt_labels_a_tasks_training_prompts_text_only():
    """`data.train_on_prompt=[passkey]`: the training passkey samples are trained on their
    document's text as well as the answer; headers and media placeholders stay unlabelled,
    the other tasks and the validation samples are as before, and a typo is named."""
    from herd.data.chat import chat_turns
    from herd.data.chat_module import ChatInputSpec
    from herd.data.multimodal import FusionDataModule

    tokenizer = load_tokenizer("herd_bpe")
    image = tokenizer.special_ids["<|image|>"]
    user = [image, *tokenizer.encode(" a digit")]
    plain = chat_turns([("user", user), ("assistant", "seven")], tokenizer)
    full = chat_turns([("user", user), ("assistant", "seven")], tokenizer, train_on_prompt=True)
    assert full["input_ids"] == plain["input_ids"] and full["prompt_len"] == plain["prompt_len"]
    labelled = [y for y in full["labels"] if y != IGNORE_INDEX]
    assert labelled == [*user[1:], tokenizer.eot_id, *tokenizer.encode("seven"), tokenizer.eot_id]

    spec = ChatInputSpec(tokenizer, None, None, 32, 1)
    weights = {"mt": 1.0, "passkey": 1.0}
    sets = {}
    for tasks in ([], ["passkey"]):
        data = FusionDataModule(
            weights=weights,
            train_size=40,
            passkey_train=20,
            translation_phrases=200,
            train_on_prompt=tasks,
        )
        data.setup_for(spec)
        data.setup("fit")
        sets[tuple(tasks)] = data
    for split in ("train", "val"):
        before, after = (sets[k].datasets[split] for k in ((), ("passkey",)))
        for i in range(len(before)):
            a, b = before[i], after[i]
            n_a, n_b = (sum(y != IGNORE_INDEX for y in s["labels"]) for s in (a, b))
            if split == "train" and a["task"] == "passkey":
                assert n_b >= n_a + 25  # the needle and question, any filler
                assert b["labels"][b["prompt_len"] :] == a["labels"][a["prompt_len"] :]
            else:
                assert b["labels"] == a["labels"]
    assert sets[("passkey",)].answer_tokens_per_batch > 2 * sets[()].answer_tokens_per_batch
    typo = FusionDataModule(weights=weights, train_size=40, train_on_prompt=["pass"])
    typo.setup_for(spec)
    with pytest.raises(ConfigError, match=r"train_on_prompt=\['pass'\] must name training tasks"):
        typo.setup("fit")


def _contains(ids: list[int], run: list[int]) -> bool:
    return any(ids[i : i + len(run)] == run for i in range(len(ids)))
