"""Speech stage: numbers text, the embedded corpus, audio I/O, encoder/adapter shapes and
padding, CTC units, decoding and WER, bad-data errors, and a short real training run."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from herd.data.audio import SpecAugment, read_audio
from herd.data.ctc_units import CharUnits, SubwordUnits, load_ctc_units, normalise_transcript
from herd.data.make_speech_corpus import plan_clips
from herd.data.numbers import (
    ENGLISH_CHARACTERS,
    MIN_WORDS,
    make_phrases,
    number_to_english,
    number_to_german,
)
from herd.data.speech import DIGITS_MANIFEST, SpeechDataModule, collate_clips
from herd.errors import ConfigError, DataError
from herd.models.speech import (
    SpeechAdapter,
    SpeechAdapterConfig,
    SpeechEncoder,
    SpeechEncoderConfig,
)
from herd.systems.speech import SpeechSystem, ctc_greedy_decode

from .conftest import compose_cfg

SMALL_ENCODER = {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 128, "conv_kernel": 7}

# ----------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("n", "english", "german"),
    [
        (0, "zero", "null"),
        (1, "one", "eins"),
        (17, "seventeen", "siebzehn"),
        (21, "twenty one", "einundzwanzig"),
        (42, "forty two", "zweiundvierzig"),
        (100, "one hundred", "einhundert"),
        (101, "one hundred one", "einhunderteins"),
        (330, "three hundred thirty", "dreihundertdreißig"),
        (1999, "one thousand nine hundred ninety nine", "eintausendneunhundertneunundneunzig"),
        (21001, "twenty one thousand one", "einundzwanzigtausendeins"),
    ],
)
def test_number_words(n, english, german):
    assert number_to_english(n) == english
    assert number_to_german(n) == german


def test_numbers_out_of_range_are_refused():
    with pytest.raises(ValueError, match="0 to 999999"):
        number_to_english(10**6)
    with pytest.raises(ValueError):
        number_to_german(-1)


def test_phrases_are_deterministic_distinct_and_long_enough_for_bleu():
    phrases = make_phrases(500, seed=3)
    assert phrases == make_phrases(500, seed=3)
    assert phrases != make_phrases(500, seed=4)
    assert len({p.english for p in phrases}) == 500
    assert {p.kind for p in phrases} >= {"digits", "code", "objects"}
    for p in phrases:
        assert len(p.english.split()) >= MIN_WORDS and len(p.german.split()) >= MIN_WORDS, p
        assert set(p.english) <= ENGLISH_CHARACTERS, p
        assert p.german == p.german.lower()
    digits = next(p for p in phrases if p.kind == "digits")
    assert len(digits.english.split()) == len(digits.german.split())


# ----------------------------------------------------------------------------- corpus


def read_manifest() -> list[dict]:
    return [json.loads(line) for line in DIGITS_MANIFEST.read_text(encoding="utf-8").splitlines()]


def test_corpus_is_small_real_16k_mono_and_split_by_voice():
    root = DIGITS_MANIFEST.parent
    records = read_manifest()
    assert len(records) >= 500
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    # 1490 clips in 24 voices; the cap keeps the repo small (raised from 10 MB when the
    # second group of training voices was appended for issue 24)
    assert size <= 15 * 10**6, f"the committed corpus is {size / 1e6:.1f} MB"
    voices = defaultdict(set)
    for r in records:
        assert set(r) >= {"audio", "text", "german", "voice", "split"}
        info = sf.info(str(root / r["audio"]))
        assert (info.samplerate, info.channels) == (16_000, 1), r["audio"]
        assert 0.3 < info.duration < 8, r["audio"]
        assert len(r["text"].split()) >= MIN_WORDS and len(r["german"].split()) >= MIN_WORDS
        voices[r["split"]].add(r["voice"])
    assert set(voices) == {"train", "val", "test"}
    assert not voices["train"] & voices["val"]
    assert not voices["train"] & voices["test"]
    assert not voices["val"] & voices["test"]
    # a sample decodes to real speech, not silence or noise at full scale
    audio = read_audio(root / records[0]["audio"])
    assert 0.05 < audio.abs().max() <= 1.0


def test_committed_corpus_is_the_scripts_plan():
    """Every committed clip is the one make_speech_corpus plans (so `--keep` after an appended
    voice group renders only the new clips, and a regenerated corpus says the same words)."""
    planned = plan_clips(seed=0)
    committed = read_manifest()
    fields = ("audio", "text", "german", "voice", "split", "speed", "pitch")
    assert [[r[k] for k in fields] for r in committed] == [[c[k] for k in fields] for c in planned]


def test_read_audio_resamples_and_downmixes(tmp_path):
    t = np.arange(8000) / 8000
    tone = 0.5 * np.sin(2 * math.pi * 440 * t)
    stereo = np.stack([tone, -tone * 0 + tone], axis=1).astype(np.float32)  # [N, 2]
    sf.write(tmp_path / "a.wav", stereo, 8000)
    audio = read_audio(tmp_path / "a.wav")
    assert audio.shape == (16000,) and audio.dtype == torch.float32
    assert abs(audio.abs().max().item() - 0.5) < 0.02


def test_spec_augment_masks_only_in_training():
    augment = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=5)
    features = torch.randn(3, 100, 80)
    assert torch.equal(augment.eval()(features), features)
    masked = augment.train()(features)
    assert masked.shape == features.shape and (masked == 0).any()
    with pytest.raises(ConfigError, match="freq_masks"):
        SpecAugment(freq_masks=-1)


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("seconds", [0.37, 1.0, 2.5, 4.2])
def test_frame_rates_40ms_after_stacking_and_80ms_after_adapter(seconds):
    encoder = SpeechEncoder(SpeechEncoderConfig(**SMALL_ENCODER)).eval()
    adapter = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=96, dim=64)).eval()
    n = round(seconds * 16_000)
    features, frame_lengths = encoder.features(torch.randn(1, n), torch.tensor([n]))
    assert features.shape[-1] == 80 and abs(frame_lengths.item() - seconds / 0.010) <= 3
    hidden, lengths = encoder(torch.randn(1, n), torch.tensor([n]))
    assert hidden.shape == (1, lengths.item(), 64)
    assert encoder.output_lengths(torch.tensor([n])).tolist() == lengths.tolist()
    assert abs(lengths.item() - seconds / 0.040) <= 1.5
    embeddings, out_lengths = adapter(hidden, lengths)
    assert embeddings.shape == (1, out_lengths.item(), 96)
    assert abs(out_lengths.item() - seconds / 0.080) <= 1.5


def test_padding_never_changes_the_real_frames():
    torch.manual_seed(0)
    encoder = SpeechEncoder(SpeechEncoderConfig(**SMALL_ENCODER)).eval()
    adapter = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=32, dim=64)).eval()
    short, long = torch.randn(23_456), torch.randn(41_000)
    batch = collate_clips([{"waveform": w, "text": ""} for w in (short, long)])
    with torch.no_grad():
        alone_hidden, alone_lengths = encoder(short[None], torch.tensor([len(short)]))
        alone, n = adapter(alone_hidden, alone_lengths)
        hidden, lengths = encoder(batch["waveforms"], batch["wave_lengths"])
        batched, batched_lengths = adapter(hidden, lengths)
    assert lengths[0] == alone_lengths[0] and batched_lengths[0] == n[0]
    assert hidden.shape[1] > alone_hidden.shape[1]  # the short clip really was padded
    torch.testing.assert_close(hidden[0, : lengths[0]], alone_hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[0, : n[0]], alone[0], atol=1e-5, rtol=1e-5)
    assert batched[0, n[0] :].abs().max() == 0  # padded positions are zero


def test_config_validation():
    with pytest.raises(ConfigError, match="not divisible by n_heads"):
        SpeechEncoderConfig(dim=100, n_heads=3)
    with pytest.raises(ConfigError, match="conv_kernel must be odd"):
        SpeechEncoderConfig(conv_kernel=4)
    with pytest.raises(ConfigError, match="even head"):
        SpeechAdapterConfig(dim=12, n_heads=4)


# ----------------------------------------------------------------------------- CTC and WER


def test_ctc_greedy_decoding_of_a_known_alignment():
    units = CharUnits()
    b, a, space = units.index["b"], units.index["a"], units.index[" "]
    # frames: b b _ a a _ a space _ b   (blank = 0); the last two frames are padding
    path = [b, b, 0, a, a, 0, a, space, 0, b, a, a]
    log_probs = torch.full((1, len(path), units.vocab_size), -10.0)
    log_probs[0, torch.arange(len(path)), torch.tensor(path)] = 0.0
    ids = ctc_greedy_decode(log_probs, torch.tensor([10]))
    assert units.decode(ids[0]) == "baa b"


def test_character_units_normalise_and_round_trip():
    units = load_ctc_units("chars")
    assert units.vocab_size == 29 and units.blank_id == 0
    assert normalise_transcript("It's  Forty-Two!") == "it's forty two"
    # the ids of checkpoints trained before subword units existed: blank, space, ', a, b, c
    assert units.encode("ab c'") == [3, 4, 1, 5, 2]
    assert units.decode(units.encode("three one four")) == "three one four"


def corpus_train_words() -> set[str]:
    records = [json.loads(line) for line in DIGITS_MANIFEST.read_text().splitlines()]
    return {w for r in records if r["split"] == "train" for w in r["text"].split()}


def test_bundled_subword_units_make_every_corpus_word_one_unit():
    units = load_ctc_units("speech_digits_bpe")
    assert isinstance(units, SubwordUnits) and units.blank_id == 0
    words = corpus_train_words()
    assert len(words) > 50
    for word in words:
        assert len(units.encode(word)) == 1, word
        assert units.decode(units.encode(word)) == word
    text = "He is NINETY-nine years old"
    assert units.encode(text) == [units.encode(w)[0] for w in normalise_transcript(text).split()]
    assert units.decode(units.encode(text)) == "he is ninety nine years old"
    # a word the corpus never says is still spelt, letter by letter
    assert units.decode(units.encode("quiz jam")) == "quiz jam"
    assert len(units.encode("quiz")) > 1


@pytest.mark.slow
def test_bundled_subword_units_are_the_fit_of_the_training_transcripts(tmp_path):
    from herd.data.ctc_units import BUNDLED, main

    out = tmp_path / "units.json"
    main(["--out", str(out)])
    bundled = load_ctc_units("speech_digits_bpe").tokenizer.get_vocab()
    refit = SubwordUnits(out).tokenizer.get_vocab()
    assert refit == bundled and BUNDLED["speech_digits_bpe"].endswith(".json")


def test_units_fitted_to_a_users_manifest(manifest_dir):
    lines = [
        {"audio": "a.wav", "text": "zebra zebra quiz", "split": "train"},
        {"audio": "b.wav", "text": "Zebra, quiz!", "split": "train"},
        {"audio": "c.wav", "text": "held out words", "split": "val"},
    ]
    manifest = manifest_dir / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    from herd.data.ctc_units import main

    main(["--manifest", str(manifest), "--out", str(manifest_dir / "u.json")])
    units = load_ctc_units(str(manifest_dir / "u.json"))
    assert [len(units.encode(w)) for w in ("zebra", "quiz")] == [1, 1]
    assert len(units.encode("held")) > 1  # fitted on the training split only
    assert units.decode(units.encode("held out words")) == "held out words"


def test_bad_units_file_is_refused_with_the_fix(tmp_path):
    from tokenizers import Tokenizer, models

    with pytest.raises(ConfigError, match=r"CTC units file .*nope.json does not exist"):
        SpeechSystem(ctc_units=str(tmp_path / "nope.json"), encoder=SMALL_ENCODER)
    no_blank = tmp_path / "no_blank.json"
    Tokenizer(models.BPE(vocab={"a": 0, "<blank>": 1}, merges=[])).save(str(no_blank))
    with pytest.raises(ConfigError, match=r"no_blank.json does not have <blank> at id 0"):
        load_ctc_units(str(no_blank))
    few_letters = tmp_path / "few_letters.json"
    Tokenizer(models.BPE(vocab={"<blank>": 0, "a": 1}, merges=[])).save(str(few_letters))
    with pytest.raises(ConfigError, match=r"few_letters.json cannot spell \"'bcd"):
        load_ctc_units(str(few_letters))


@pytest.mark.parametrize("spec", ["chars", "speech_digits_bpe"])
def test_the_system_encodes_transcripts_into_ctc_targets(spec):
    system = SpeechSystem(ctc_units=spec, encoder=SMALL_ENCODER)
    assert system.ctc_head.out_features == system.units.vocab_size
    targets, lengths = system.targets(["nine one", "seven"])
    assert targets.shape == (2, lengths.max().item())
    assert lengths.tolist() == ([8, 5] if spec == "chars" else [2, 1])
    assert targets[1, lengths[1] :].eq(system.units.blank_id).all()  # padding is the blank
    decoded = [
        system.units.decode(row[:n].tolist()) for row, n in zip(targets, lengths, strict=True)
    ]
    assert decoded == ["nine one", "seven"]
    waves = torch.randn(2, 16_000)
    loss, log_probs, _ = system.loss(
        {"waveforms": waves, "wave_lengths": torch.tensor([16_000, 12_000]), "texts": ["a", "b"]}
    )
    assert torch.isfinite(loss) and log_probs.shape[-1] == system.units.vocab_size


def test_an_auxiliary_ctc_head_trains_beside_the_decoded_one():
    torch.manual_seed(0)
    words = SpeechSystem(ctc_units="speech_digits_bpe", encoder=SMALL_ENCODER).eval()
    torch.manual_seed(0)  # the same encoder and decoded head: the auxiliary head comes after
    both = SpeechSystem(
        ctc_units="speech_digits_bpe",
        aux_ctc_units="chars",
        aux_ctc_weight=0.5,
        encoder=SMALL_ENCODER,
    ).eval()
    assert both.aux_ctc_head.out_features == 29 and not hasattr(words, "aux_ctc_head")
    waves, lengths = torch.randn(2, 16_000), torch.tensor([16_000, 12_000])
    batch = {"waveforms": waves, "wave_lengths": lengths, "texts": ["nine one", "seven"]}
    words_loss, words_log_probs, _ = words.loss(batch)
    both_loss, both_log_probs, _ = both.loss(batch)
    torch.testing.assert_close(both_log_probs, words_log_probs)  # decoding is unchanged
    hidden, frames = both.encode(waves, lengths)
    chars = torch.log_softmax(both.aux_ctc_head(hidden), dim=-1)
    aux = both.ctc_loss(chars, frames, batch["texts"], both.aux_units)
    torch.testing.assert_close(both_loss, words_loss + 0.5 * aux)
    both_loss.backward()
    assert both.aux_ctc_head.weight.grad.abs().sum() > 0


def test_word_and_character_error_rates_on_known_strings():
    from torchmetrics.text import CharErrorRate, WordErrorRate

    wer, cer = WordErrorRate(), CharErrorRate()
    # one substitution and one deletion over 6 reference words; 0 errors in the second pair
    wer.update(["one two three", "four five six"], ["one two nine four", "four five six"])
    assert wer.compute().item() == pytest.approx(2 / 7)
    cer.update(["abc"], ["abd"])
    assert cer.compute().item() == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- bad data


def write_clip(path: Path, seconds: float = 0.5) -> None:
    sf.write(path, (0.1 * np.random.randn(int(seconds * 16_000))).astype(np.float32), 16_000)


@pytest.fixture
def manifest_dir(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_clip(tmp_path / f"{name}.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.flac").write_bytes(b"fLaC not really audio" * 20)
    write_clip(tmp_path / "long.wav", seconds=3.0)
    return tmp_path


def write_manifest(root: Path, audios: list[str]) -> Path:
    lines = [
        json.dumps({"audio": a, "text": "one two", "split": "val" if i == 0 else "train"})
        for i, a in enumerate(audios)
    ]
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("missing.wav", "does not exist"),
        ("empty.wav", "is empty"),
        ("corrupt.flac", "cannot be decoded"),
        ("long.wav", r"is 3.0 s long, longer than data.max_seconds=2"),
    ],
)
def test_bad_audio_names_the_file_and_line(manifest_dir, bad, reason):
    manifest = write_manifest(manifest_dir, ["a.wav", "b.wav", bad, "c.wav"])
    data = SpeechDataModule(source="manifest", manifest=str(manifest), max_seconds=2.0)
    with pytest.raises(DataError, match=rf"manifest.jsonl, line 3: audio file .*{bad} {reason}"):
        data.setup("fit")


def test_bad_audio_is_skipped_and_counted_when_configured(manifest_dir, caplog):
    audios = ["a.wav", "b.wav", "missing.wav", "empty.wav", "corrupt.flac", "long.wav", "c.wav"]
    manifest = write_manifest(manifest_dir, audios)
    data = SpeechDataModule(
        source="manifest", manifest=str(manifest), max_seconds=2.0, skip_bad_samples=True
    )
    data.setup("fit")
    assert len(data.clips["train"]) + len(data.clips["val"]) == 3
    assert "Skipped 4 bad line(s)" in caplog.text
    batch = next(iter(data.train_dataloader()))
    assert batch["waveforms"].shape[0] == batch["wave_lengths"].shape[0] == 2


def test_manifest_without_text_is_refused(manifest_dir):
    path = manifest_dir / "m.jsonl"
    path.write_text('{"audio": "a.wav", "text": "one"}\n{"audio": "b.wav"}\n')
    with pytest.raises(DataError, match=r"m.jsonl, line 2: missing a string \"text\" field"):
        SpeechDataModule(source="manifest", manifest=str(path)).setup("fit")


# ----------------------------------------------------------------------------- training


def test_experiment_composes_to_the_speech_stage(tmp_path):
    cfg = compose_cfg("train", ["experiment=speech_digits"], tmp_path / "run")
    assert cfg.model._target_ == "herd.systems.SpeechSystem"
    assert cfg.data._target_ == "herd.data.SpeechDataModule"
    assert cfg.callbacks.model_checkpoint.monitor == "val/wer"
    # the recipe's speech stage: 1000 steps, word units with a character head beside them
    assert cfg.trainer.max_steps == 1000 and cfg.trainer.val_check_interval == 250
    assert (cfg.model.ctc_units, cfg.model.aux_ctc_units) == ("speech_digits_bpe", "chars")


@pytest.mark.slow
def test_short_speech_run_learns_and_reloads(tmp_path):
    """A real CTC run on the embedded corpus: the loss falls clearly, metrics.json has WER and
    CER, and the checkpoint reopens weights-only with the encoder as `.model` and its units."""
    from herd.systems.common import load_system
    from herd.train import train

    overrides = [
        "experiment=speech_digits",
        *(f"model.encoder.{k}={v}" for k, v in SMALL_ENCODER.items()),
        "model.scheduler.warmup_steps=10",
        "model.optimizer.lr=3e-3",
        "data.batch_size=16",
        "data.speed_perturb=[]",
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
        "callbacks.model_summary=null",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    metrics = train(cfg)
    for key in ("val/wer", "val/cer", "test/wer", "test/cer", "test/wer_empty"):
        assert key in metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test/wer"] == pytest.approx(metrics["test/wer"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0}).Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < 0.6 * losses[0], losses
    assert {"train/lr", "train/grad_norm", "val/wer", "val/cer"} <= set(events.Tags()["scalars"])
    assert events.Tags()["audio"] and events.Tags()["images"]

    system = load_system(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(system, SpeechSystem) and isinstance(system.model, SpeechEncoder)
    # the experiment's word units and auxiliary character head come back with the checkpoint
    assert system.hparams.ctc_units == "speech_digits_bpe"
    assert isinstance(system.units, SubwordUnits)
    assert system.ctc_head.out_features == system.units.vocab_size
    assert isinstance(system.aux_units, CharUnits) and system.aux_ctc_head.out_features == 29
    wave = torch.randn(1, 16_000)
    hidden, lengths = system.model.eval()(wave, torch.tensor([16_000]))
    assert hidden.shape == (1, 24, SMALL_ENCODER["dim"]) and lengths.tolist() == [24]


def test_the_speech_stage_pads_training_clips_with_silence_only():
    """data.silence_pad in the speech stage: each training clip gains up to that many seconds
    of zeros on each side, drawn from the sample's place in the stream; val and test clips
    stay as recorded, and a negative value is named."""
    from herd.data.audio import SAMPLE_RATE
    from herd.data.speech import SpeechDataModule

    data = SpeechDataModule(silence_pad=0.25, speed_perturb=[], seed=3)
    data.setup("fit")
    train, clips = data.datasets["train"], data.clips["train"]
    extra = [(len(train[i]["waveform"]) - len(clips[i].waveform)) / SAMPLE_RATE for i in range(40)]
    assert 0 <= min(extra) and max(extra) <= 0.5 and len(set(extra)) > 30
    assert torch.equal(train[5]["waveform"], data.datasets["train"][5]["waveform"])  # drawn again
    for i in range(3):  # the clip itself, whole, with zeros on both sides
        waveform, clip = train[i]["waveform"], clips[i].waveform
        starts = [
            k
            for k in range(len(waveform) - len(clip) + 1)
            if torch.equal(waveform[k : k + len(clip)], clip)
        ]
        assert len(starts) == 1, starts
        k = starts[0]
        assert not waveform[:k].any() and not waveform[k + len(clip) :].any()
    for split in ("val", "test"):
        assert torch.equal(data.datasets[split][0]["waveform"], data.clips[split][0].waveform)
    with pytest.raises(ConfigError, match="silence_pad must be >= 0"):
        SpeechDataModule(silence_pad=-0.1)
