"""The composed multimodal model: placeholders, gates, fine-tuning strategies, LoRA."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from herd.data.chat import Example, collate, encode_example
from herd.data.multimodal import ExampleDataset
from herd.data.tokenizer import load_tokenizer
from herd.errors import ConfigError
from herd.models.fusion import FusionModel, build_fusion_model
from herd.models.llama import Llama, LlamaConfig
from herd.models.lora import LoRALinear, add_lora, merge_lora
from herd.models.speech import SpeechEncoder, SpeechEncoderConfig
from herd.models.vision import ImageEncoder, ImageEncoderConfig, TanhGate
from herd.systems.finetune import STRATEGIES, apply_finetune_strategy, decoder_core_parameters

from .helpers.generation import recomputed_greedy

TOKENIZER = load_tokenizer("bytes")
SPECIAL = TOKENIZER.special_ids


def tiny_fusion(image=True, speech=True, every=1) -> FusionModel:
    torch.manual_seed(0)
    decoder = Llama(LlamaConfig.from_flavor("tiny", vocab_size=TOKENIZER.vocab_size))
    image_encoder = (
        ImageEncoder(
            ImageEncoderConfig(
                img_size=16,
                patch_size=4,
                feature_layers=(0,),
                lm_dim=32,  # not the decoder's 64: the fusion model re-projects
                backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
            )
        )
        if image
        else None
    )
    speech_encoder = (
        SpeechEncoder(SpeechEncoderConfig(dim=32, n_layers=1, n_heads=2, ffn_dim=64, dropout=0.0))
        if speech
        else None
    )
    return build_fusion_model(
        decoder,
        SPECIAL["<|image|>"],
        SPECIAL["<|speech|>"],
        image_encoder,
        speech_encoder,
        cross_attention_every=every,
        speech_adapter={"dim": 32, "n_heads": 2, "ffn_dim": 64},
    ).eval()


def batch_of(model: FusionModel, examples: list[Example]) -> dict:
    data = ExampleDataset(examples, TOKENIZER, model.speech_tokens)
    return collate([data[i] for i in range(len(data))], TOKENIZER.pad_id)


def inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("images", "image_mask", "audio", "audio_lengths") if k in batch}


def open_gates(model: FusionModel, value: float) -> None:
    """Set the fusion gates (cross-attention's) to `value`; they start at 0."""
    for module in model.cross_attention.modules():
        if isinstance(module, TanhGate):
            torch.nn.init.constant_(module.gate, value)


EXAMPLES = [
    Example("image", "<|image|>which digit?", "seven", images=(torch.rand(1, 16, 16) * 2 - 1,)),
    Example("asr", "<|speech|>transcribe.", "one two three four", audio=(torch.randn(8000) * 0.1,)),
    Example("mt", "translate into german: one two three four", "eins zwei drei vier"),
]


def test_prompt_layout_and_answer_only_labels():
    model = tiny_fusion()
    encoded = encode_example(EXAMPLES[1], TOKENIZER, model.speech_tokens)
    ids, labels = encoded["input_ids"], encoded["labels"]
    n_speech = ids.count(SPECIAL["<|speech|>"])
    # 0.5 s: 48 mel frames (25 ms windows, 10 ms hop) -> 12 of 40 ms -> 6 embeddings of 80 ms
    assert n_speech == model.speech_tokens(8000) == 6
    answer = TOKENIZER.encode("one two three four") + [TOKENIZER.eot_id]
    assert ids[-len(answer) :] == answer and len(ids) == encoded["prompt_len"] + len(answer)
    # labels are next-token targets on the answer only: position t predicts ids[t + 1]
    targets = [(t, y) for t, y in enumerate(labels) if y != -100]
    assert [y for _, y in targets] == answer
    assert all(ids[t + 1] == y for t, y in targets)
    assert targets[0][0] == encoded["prompt_len"] - 1


def test_speech_embeddings_land_exactly_on_the_placeholders():
    model = tiny_fusion()
    batch = batch_of(model, EXAMPLES)
    tokens = batch["input_ids"]
    embeds = model.embed(tokens, batch["audio"], batch["audio_lengths"])
    plain = model.decoder.embed_tokens(tokens)
    placeholders = tokens == SPECIAL["<|speech|>"]
    hidden, lengths = model.speech_encoder(batch["audio"][1:2, 0], batch["audio_lengths"][1:2, 0])
    speech, _ = model.speech_adapter(hidden, lengths)  # [1, L, D]
    torch.testing.assert_close(embeds[placeholders], speech[0])
    assert torch.equal(embeds[~placeholders], plain[~placeholders])  # nothing else moved


def test_without_media_and_with_zero_gates_the_decoder_alone_is_reproduced():
    model = tiny_fusion()
    decoder_alone = copy.deepcopy(model.decoder)
    batch = batch_of(model, EXAMPLES)
    with torch.no_grad():
        fused = model(batch["input_ids"], **inputs(batch))
        # text-only sample: bit-identical to the plain decoder
        text_only = batch["input_ids"][2:3]
        assert torch.equal(model(text_only), decoder_alone(text_only))
        # with an image attached, gates at 0 still leave the logits unchanged
        image_row = batch["input_ids"][0:1]
        with_image = model(image_row, images=batch["images"][0:1])
        assert torch.equal(with_image, decoder_alone(image_row))
    assert fused.shape == (*batch["input_ids"].shape, TOKENIZER.vocab_size)


def test_text_before_the_image_does_not_see_it():
    model = tiny_fusion()
    open_gates(model, 1.0)
    tokens = torch.tensor([[*TOKENIZER.encode("look:"), SPECIAL["<|image|>"], 50, 51]])
    images = [torch.rand(1, 1, 1, 16, 16), torch.rand(1, 1, 1, 16, 16)]
    with torch.no_grad():
        a, b = (model(tokens, images=im) for im in images)
    cut = tokens[0].tolist().index(SPECIAL["<|image|>"])
    assert torch.equal(a[:, :cut], b[:, :cut])  # before the image: identical
    assert not torch.allclose(a[:, cut:], b[:, cut:])  # from the image on: it matters


def test_named_parts_are_frozen_under_any_strategy_and_typos_are_refused():
    model = tiny_fusion()
    counts = apply_finetune_strategy(model, "full", frozen=("image_encoder", "speech_encoder"))
    for name, p in model.named_parameters():
        assert p.requires_grad != name.startswith(("image_encoder.", "speech_encoder."))
    frozen = [*model.image_encoder.parameters(), *model.speech_encoder.parameters()]
    assert counts["frozen"] == sum(p.numel() for p in frozen)
    with pytest.raises(ConfigError, match="finetune.frozen names 'vision', not one of"):
        apply_finetune_strategy(model, "full", frozen=("vision",))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_frozen_parts_stay_put_and_trainable_counts_match(strategy):
    model = tiny_fusion()
    counts = apply_finetune_strategy(model, strategy, top_layers=1, lora={"rank": 2})
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    core_ids = {id(p) for p in decoder_core_parameters(model)}
    core = {n for n, p in named.items() if id(p) in core_ids}
    top_layer = f"decoder.layers.{len(model.decoder.layers) - 1}."
    expected_core = {
        "full": core,
        "partial": {n for n in core if n.startswith((top_layer, "decoder.norm."))},
        "adapter": set(),
        "lora": set(),
    }[strategy]
    assert trainable & core == expected_core
    assert trainable - core == set(named) - core  # encoders, adapters (and LoRA) always train
    assert any(".lora_" in n for n in named) == (strategy == "lora")
    assert counts["trainable"] == sum(named[n].numel() for n in trainable)
    assert counts["frozen"] == sum(p.numel() for n, p in named.items() if n not in trainable)

    model.train()
    before = {n: p.detach().clone() for n, p in named.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # gates at 0 would hide the adapters from the gradient: open them a little
    open_gates(model, 0.5)
    before_gates = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batch_of(model, EXAMPLES)
    logits = model(batch["input_ids"], **inputs(batch))
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100
    )
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before_gates[name])
        if name not in trainable:
            assert not moved and p.grad is None, name
    changed_core = {n for n in core if not torch.equal(named[n], before[n])}
    assert changed_core <= expected_core
    if strategy != "adapter" and strategy != "lora":
        assert changed_core  # some of the decoder did learn


def test_merged_lora_computes_what_the_adapted_model_computes():
    torch.manual_seed(0)
    decoder = Llama(LlamaConfig.from_flavor("tiny", vocab_size=TOKENIZER.vocab_size))
    original = copy.deepcopy(decoder)
    assert add_lora(decoder, rank=4, alpha=8.0) == 7 * len(decoder.layers)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(decoder(tokens), original(tokens))  # B = 0: unchanged at first
        for module in decoder.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(std=0.1)
        adapted = decoder(tokens)
        assert not torch.allclose(adapted, original(tokens))
        assert merge_lora(decoder) == 7 * len(decoder.layers)
        assert not any(isinstance(m, LoRALinear) for m in decoder.modules())
        torch.testing.assert_close(decoder(tokens), adapted, atol=1e-5, rtol=0)
    # the merged model has the original's parameter names: it exports like any decoder
    assert set(dict(decoder.named_parameters())) == set(dict(original.named_parameters()))


def test_generation_stops_at_the_stop_token_and_keeps_media():
    model = tiny_fusion()
    batch = batch_of(model, EXAMPLES[:1])
    prompt = batch["input_ids"][:, : int(batch["prompt_len"][0])]
    out = model.generate(prompt, 5, images=batch["images"])
    assert len(out) == 5
    # with a cache, the answer equals step-by-step recomputation of the whole sequence
    assert out == recomputed_greedy(model, prompt, 5, images=batch["images"])


def test_spec_augment_masks_speech_in_training_only():
    from herd.data.audio import SpecAugment

    plain = tiny_fusion(image=False)
    augmented = tiny_fusion(image=False)
    augmented.speech_augment = SpecAugment(freq_masks=2, freq_width=20, time_masks=2)
    augmented.eval()
    batch = batch_of(plain, EXAMPLES[1:2])
    ids, audio = batch["input_ids"], inputs(batch)
    # eval: the augmentation is the identity
    assert torch.equal(plain.embed(ids, **audio), augmented.embed(ids, **audio))
    torch.manual_seed(0)
    assert not torch.equal(plain.train().embed(ids, **audio), augmented.train().embed(ids, **audio))


def test_a_checkpoint_decoder_takes_the_runs_context():
    """context= reaches a trained decoder (fusion and fine-tuning load one): a longer window
    inside the RoPE's original length changes nothing for short inputs; past it, only a
    scaled context is accepted."""
    from herd.errors import ConfigError
    from herd.systems.language import with_context

    decoder = Llama(LlamaConfig.from_flavor("tiny", vocab_size=TOKENIZER.vocab_size)).eval()
    tokens = torch.randint(0, TOKENIZER.vocab_size, (1, 20))
    before = decoder(tokens)
    with_context(decoder, {"max_seq_len": 8192, "rope_scaling": None}, "tiny")
    assert decoder.config.max_seq_len == 8192
    assert torch.equal(decoder(tokens), before)
    with pytest.raises(ConfigError, match="longer than the 8192 that tiny supports"):
        with_context(decoder, {"max_seq_len": 32768, "rope_scaling": None}, "tiny")


TINY_FUSION = [
    "experiment=fusion_digits",
    "model.language.llama.flavor=tiny",
    "++model.vision.encoder={patch_size: 8, feature_layers: [0],"
    " backbone_kwargs: {embed_dim: 32, depth: 2, num_heads: 2}}",
    "++model.speech.encoder={dim: 32, n_layers: 1, n_heads: 2, ffn_dim: 64, dropout: 0.0}",
    "model.speech.adapter={dim: 32, n_heads: 2, ffn_dim: 64}",
    "model.max_new_tokens=12",
    "data.train_size=600",
    "data.val_per_task=2",
    "data.test_per_task=2",
    "data.batch_size=8",
    "trainer.max_steps=40",
    "model.scheduler.warmup_steps=5",
    "model.optimizer.lr=3e-3",
    "trainer.val_check_interval=20",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null",
]


@pytest.mark.slow
def test_fusion_trains_under_ddp_with_two_cpu_processes(tmp_path):
    """Batches without images skip the cross-attention layers (and without speech the speech
    encoder), which plain DDP stops on; the fusion stage gets DDP's variant that looks for
    unused parameters."""
    import torch

    from herd.train import train

    from .conftest import compose_cfg

    overrides = [*TINY_FUSION, "strategy=ddp_spawn", "trainer.max_steps=6", "test=false"]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    train(cfg)
    last = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 6


@pytest.mark.slow
def test_fusion_trains_under_bf16_autocast_with_clipping_and_the_fused_optimizer(tmp_path):
    """Lightning's own clipping (here by value) refuses an optimizer that unscales fp16
    gradients itself (fused AdamW), under bf16 too; herd's optimizers take the ordinary path."""
    import math

    import torch

    from herd.train import train

    from .conftest import compose_cfg

    overrides = [*TINY_FUSION, "precision=bf16_mixed", "trainer.max_steps=3", "test=false"]
    overrides += ["+trainer.gradient_clip_algorithm=value"]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    assert cfg.trainer.gradient_clip_val > 0 and cfg.model.optimizer.fused
    metrics = train(cfg)
    last = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert math.isfinite(metrics["train/loss"])


@pytest.mark.slow
def test_short_real_fusion_run_learns_and_reopens(tmp_path):
    import json
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from herd.systems.common import load_system
    from herd.train import train

    from .conftest import compose_cfg

    counted = "callbacks.throughput.flops_every_n_steps=10"  # steps 10, 20, 30 and 40
    cfg = compose_cfg("train", [*TINY_FUSION, counted], tmp_path / "run")
    metrics = train(cfg)
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    for name in ("top1", "wer", "bleu_st", "bleu_mt", "passkey_acc", "loss"):
        assert f"test/{name}" in saved, name
    assert saved == pytest.approx(metrics)
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # the answers are being learnt
    assert "samples/answers_val/text_summary" in events.Tags()["tensors"]
    # achieved FLOP/s, from the FLOPs torch counted in those steps (from the first on): per
    # token, at least the decoder's matmuls forward (2 x its ~0.4 M weights), at most all
    # parameters x 6 x 20
    tflops = {e.step: e.value for e in events.Scalars("perf/tflops")}
    tokens_per_sec = {e.step: e.value for e in events.Scalars("perf/tokens_per_sec")}
    assert sorted(tflops) == list(range(9, 40))
    n_params = sum(p.numel() for p in load_system(run / "checkpoints" / "last.ckpt").parameters())
    for step, value in tflops.items():
        per_token = value * 1e12 / tokens_per_sec[step]
        assert 2 * 0.4e6 < per_token < 6 * 20 * n_params, (step, per_token)
    # the checkpoint rebuilds the composed model without the stage checkpoints
    system = load_system(run / "checkpoints" / "last.ckpt")
    assert type(system).__name__ == "FusionSystem"
    assert system.model.image_encoder is not None and system.model.speech_encoder is not None
    # full fine-tuning: the optimizer held every parameter (the gradients are another test's)
    trained = json.loads((run / "trained_parameters.json").read_text())
    assert trained["optimizer"] == trained["all"]
    assert any(part.startswith("decoder.layers.") for part in trained["optimizer"])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["partial", "adapter", "lora"])
def test_trained_parameters_are_read_from_the_optimizer(tmp_path, strategy):
    """What trained, from the optimizer and the gradients of its steps: under the frozen-LM
    recipes no decoder weight is in the optimizer; under lora exactly its LoRA matrices are,
    and they receive gradients."""
    from herd.callbacks.trained_parameters import read_summary
    from herd.report import build_report
    from herd.train import train

    from .conftest import compose_cfg

    overrides = [*TINY_FUSION, f"finetune={strategy}", "trainer.max_steps=4", "test=false"]
    overrides += ["finetune.top_layers=1"] if strategy == "partial" else []
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    train(cfg)
    trained = read_summary(tmp_path / "run")
    in_optimizer, with_grad = trained["optimizer"], trained["gradients"]
    decoder = [part for part in in_optimizer if part.startswith("decoder.")]
    layers = [p for p in trained["all"] if p.startswith("decoder.layers.") and "LoRA" not in p]
    assert layers == ["decoder.layers.0-1"]  # the tiny flavor's two layers, as one part
    if strategy == "partial":  # the top layer of two, and the final norm
        assert decoder == ["decoder.layers.0-1", "decoder.norm"], decoder
        assert trained["optimizer_layers"] == {"decoder.layers.0-1": "1"}
        assert in_optimizer["decoder.layers.0-1"] == trained["all"]["decoder.layers.0-1"] // 2
    elif strategy == "adapter":
        assert decoder == []
    else:
        assert decoder == ["decoder.layers.0-1 (LoRA)"], decoder
        assert with_grad[decoder[0]] == in_optimizer[decoder[0]]
    adapters = [p for p in trained["all"] if p.startswith(("speech_adapter", "cross_attention"))]
    assert adapters and all(in_optimizer.get(p) == trained["all"][p] for p in adapters)
    assert set(with_grad) <= set(in_optimizer)  # a gradient only where the optimizer looks
    assert with_grad["image_projection"] == in_optimizer["image_projection"]  # images were seen
    (tmp_path / "run" / ".hydra").mkdir()  # what herd-train's Hydra run leaves (compose does not)
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text(f"- finetune={strategy}\n")
    report = build_report(tmp_path / "run")
    assert "## Trained parameters" in report and "decoder.layers.0" in report
    if strategy == "partial":
        assert "(layers 1)" in report


# ----------------------------------------------------------------------------- many media


def two_image_tokens() -> torch.Tensor:
    """text <|image|> text <|image|> text: rows 0-1 see no image, 2-4 the first, 5-7 the
    second (as Llama 3.2 Vision: the most recent image)."""
    img = SPECIAL["<|image|>"]
    return torch.tensor([[40, 41, img, 42, 43, img, 44, 45]])


def seen_images(model, tokens, image_mask) -> list[list[int]]:
    """[T][I] 0/1: which images each text row of one sample may attend to."""
    spans = model.image_spans(tokens, image_mask)
    media = torch.zeros(1, image_mask.shape[1], 3, 64)  # [B, I, N, D]
    _, sees, _ = model.image_media(spans, image_mask, media, 0, tokens.shape[1])  # [1, T, I*N]
    return sees.view(tokens.shape[1], image_mask.shape[1], 3).all(dim=-1).int().tolist()


def test_a_text_row_sees_the_most_recent_image_as_mllama_does():
    model = tiny_fusion(speech=False)
    tokens = two_image_tokens()
    both = torch.ones(1, 2, dtype=torch.bool)
    expected = [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]]
    assert seen_images(model, tokens, both) == expected
    # consecutive placeholders form one group: the text after them sees both
    img = SPECIAL["<|image|>"]
    grouped = torch.tensor([[40, img, img, 42, 43]])
    assert seen_images(model, grouped, both) == [[0, 0], [1, 0], [1, 1], [1, 1], [1, 1]]
    # a padding slot (image_mask False) is never seen; the real image takes the placeholder
    one = torch.tensor([[40, img, 42]])
    assert seen_images(model, one, torch.tensor([[True, False]])) == [[0, 0], [1, 0], [1, 0]]
    with pytest.raises(ValueError, match="placeholders per sample \\[2\\] != images \\[1\\]"):
        model.image_spans(tokens, torch.tensor([[True, False]]))


def test_earlier_rows_ignore_later_images_and_rows_before_any_equal_the_decoder():
    model = tiny_fusion(speech=False)
    open_gates(model, 1.0)
    tokens = two_image_tokens()
    first, second, other = (torch.rand(1, 1, 1, 16, 16) for _ in range(3))
    with torch.no_grad():
        alone = model.decoder(tokens)
        a = model(tokens, images=torch.cat([first, second], dim=1))  # [1, 2, C, H, W]
        b = model(tokens, images=torch.cat([first, other], dim=1))  # only image 2 differs
        c = model(tokens, images=torch.cat([other, second], dim=1))  # only image 1 differs
    assert torch.equal(a[:, :2], alone[:, :2])  # before any image: the decoder alone
    assert torch.equal(a[:, :5], b[:, :5])  # a later image never changes earlier rows
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert not torch.allclose(a[:, 2:5], c[:, 2:5])  # the first image matters from its token
    # rows after the second image no longer see the first, but read it through
    # self-attention from the rows that did
    assert not torch.allclose(a[:, 5:], c[:, 5:])


def test_generation_with_two_images_equals_recomputing_the_whole_sequence():
    model = tiny_fusion(speech=False)
    open_gates(model, 1.0)
    prompt = two_image_tokens()
    images = torch.rand(1, 2, 1, 16, 16)
    out = model.generate(prompt, 4, images=images)
    assert out == recomputed_greedy(model, prompt, 4, images=images)


def test_padded_images_of_another_sample_change_nothing():
    model = tiny_fusion(speech=False)
    open_gates(model, 1.0)
    one = Example("image", "<|image|>which digit?", "seven", images=(torch.rand(1, 16, 16),))
    two = Example("image", "<|image|> and <|image|>?", "one", images=(torch.rand(1, 16, 16),) * 2)
    batch = batch_of(model, [one, two])
    assert batch["images"].shape[:2] == (2, 2) and batch["image_mask"].tolist() == [
        [True, False],
        [True, True],
    ]
    alone = batch_of(model, [one])
    T = alone["input_ids"].shape[1]
    with torch.no_grad():
        together = model(batch["input_ids"], **inputs(batch))[:1, :T]
        single = model(alone["input_ids"], **inputs(alone))
    torch.testing.assert_close(together, single)


def test_cross_attention_runs_only_on_the_samples_with_an_image():
    # The layers skip samples without an image (a speed-up); with open gates every sample
    # must still compute what it computes alone.
    model = tiny_fusion(speech=False)
    open_gates(model, 1.0)
    seen = Example("image", "<|image|>which digit?", "seven", images=(torch.rand(1, 16, 16),))
    text = Example("mt", "translate: four two", "vier zwei")
    other = Example("image", "and <|image|>?", "one", images=(torch.rand(1, 16, 16),))
    examples = [text, seen, text, other]
    batch = batch_of(model, examples)
    rows_seen = []
    layer = next(iter(model.cross_attention.values()))
    layer.register_forward_hook(lambda module, args, out: rows_seen.append(out.shape[0]))
    with torch.no_grad():
        together = model(batch["input_ids"], **inputs(batch))
    assert rows_seen == [2]  # the two samples with an image, not all four
    with torch.no_grad():
        for b, example in enumerate(examples):
            alone = batch_of(model, [example])
            T = alone["input_ids"].shape[1]
            single = model(alone["input_ids"], **inputs(alone))
            torch.testing.assert_close(together[b : b + 1, :T], single)


def test_several_clips_splice_in_order_and_a_missing_clip_is_an_error():
    model = tiny_fusion(image=False)
    clips = (torch.randn(8000) * 0.1, torch.randn(12000) * 0.1)
    example = Example("asr", "first <|speech|> then <|speech|> end.", "a b", audio=clips)
    batch = batch_of(model, [example])
    tokens = batch["input_ids"]
    assert batch["audio"].shape[:2] == (1, 2) and batch["audio_lengths"].tolist() == [[8000, 12000]]
    embeds = model.embed(tokens, batch["audio"], batch["audio_lengths"])
    slots = (tokens[0] == SPECIAL["<|speech|>"]).nonzero().flatten().tolist()
    n0, n1 = model.speech_tokens(8000), model.speech_tokens(12000)
    assert len(slots) == n0 + n1 and slots[n0] - slots[n0 - 1] > 1  # two runs, text between
    expected = []
    for clip in clips:  # each clip encoded alone
        hidden, lengths = model.speech_encoder(clip[None], torch.tensor([clip.shape[0]]))
        speech, _ = model.speech_adapter(hidden, lengths)
        expected.append(speech[0])
    torch.testing.assert_close(embeds[0, slots[:n0]], expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(embeds[0, slots[n0:]], expected[1], atol=1e-5, rtol=1e-4)
    # a prompt with two speech markers but one clip names the mismatch
    with pytest.raises(ValueError, match="2 <\\|speech\\|> marker\\(s\\) but 1 audio clip"):
        encode_example(
            Example("asr", "<|speech|> and <|speech|>", "x", audio=clips[:1]),
            TOKENIZER,
            model.speech_tokens,
        )
    # and a batch whose clips do not cover its placeholders is refused
    with pytest.raises(ValueError, match="Speech placeholders per sample"):
        model.embed(tokens, batch["audio"][:, :1], batch["audio_lengths"][:, :1])


def test_the_gates_are_found_by_type_for_their_own_learning_rate():
    from herd.systems.common import decay_param_groups
    from herd.systems.fusion import FusionSystem

    system = FusionSystem(
        language={"llama": {"flavor": "tiny"}, "tokenizer": "bytes"},
        vision={
            "encoder": {
                "img_size": 16,
                "patch_size": 4,
                "feature_layers": [0],
                "n_gated_layers": 1,
                "gated_heads": 2,
                "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
            }
        },
        speech=None,
        cross_attention_every=2,
        gate_lr_multiplier=30.0,
        encoder_lr_multiplier=0.1,
    )
    groups = decay_param_groups(system, 0.1, system.lr_multipliers())
    scaled = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    gates = [m.gate for m in system.model.cross_attention.modules() if isinstance(m, TanhGate)]
    assert len(gates) == 2 * len(system.model.cross_attention_layers)  # attention + MLP
    assert all(scaled[id(g)] == 30.0 for g in gates)
    encoder_gates = [
        m.gate for m in system.model.image_encoder.modules() if isinstance(m, TanhGate)
    ]
    assert encoder_gates and all(scaled[id(g)] == 0.1 for g in encoder_gates)
    q = system.model.cross_attention["1"].q_proj.weight
    assert scaled[id(q)] == 1.0


def test_a_fusion_checkpoint_starts_another_run_at_its_own_context(tmp_path):
    import lightning as L

    from herd.systems.fusion import FusionSystem

    tiny_image = {"img_size": 16, "patch_size": 4, "feature_layers": [0], "lm_dim": 32}
    source = FusionSystem(
        language={"llama": {"flavor": "tiny", "max_seq_len": 512}, "tokenizer": "bytes"},
        vision={
            "encoder": {
                **tiny_image,
                "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
            }
        },
        speech=None,
        cross_attention_every=2,
    )
    open_gates(source.model, 0.5)  # weights that differ from a fresh build
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(source)
    trainer.save_checkpoint(tmp_path / "fusion.ckpt")

    scaling = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling["original_max_seq_len"] = 512
    continued = FusionSystem(
        language={"llama": {"flavor": "small", "max_seq_len": 2048, "rope_scaling": scaling}},
        vision={"encoder": {}},  # replaced by the source's architecture
        speech=None,
        cross_attention_every=1,
        init_from=str(tmp_path / "fusion.ckpt"),
    )
    assert continued.model.cross_attention_layers == source.model.cross_attention_layers
    assert continued.model.decoder.config.max_seq_len == 2048
    assert continued.model.decoder.config.rope_scaling is not None
    theirs = source.model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in continued.model.state_dict().items())
    assert continued.hparams.init_from is None  # its own checkpoints hold the weights


def test_a_language_checkpoint_brings_its_tokenizer_and_a_different_one_is_refused(tmp_path):
    import lightning as L

    from herd.systems.fusion import FusionSystem
    from herd.systems.language import LanguageSystem

    stage = LanguageSystem(llama={"flavor": "tiny", "max_seq_len": 512}, tokenizer="bytes")
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(tmp_path / "language.ckpt")
    language = {"checkpoint": str(tmp_path / "language.ckpt"), "llama": {"max_seq_len": 512}}

    fused = FusionSystem(language={**language, "tokenizer": None}, vision=None, speech=None)
    assert fused.hparams.language["tokenizer"] == "bytes"
    assert fused.tokenizer.vocab_size == stage.tokenizer.vocab_size
    with pytest.raises(ConfigError, match="tokenizer=herd_bpe_digits differs from bytes"):
        FusionSystem(
            language={**language, "tokenizer": "herd_bpe_digits"}, vision=None, speech=None
        )


def test_loss_weights_scale_a_tasks_answers_in_the_training_loss(tmp_path):
    """`data.loss_weights={mt: 3}`: a translation batch's training loss is three times the
    unweighted one, other tasks' batches are unchanged, and a typo is named."""
    from hydra.utils import instantiate

    from .conftest import compose_cfg

    overrides = [*TINY_FUSION, "model.vision=null", "model.speech=null"]
    overrides += ["data.weights={image: 0, asr: 0, st: 0, mt: 1, passkey: 1}", "data.train_size=32"]
    cfg = compose_cfg("train", [*overrides, "data.loss_weights={mt: 3.0}"], tmp_path / "run")
    system = instantiate(cfg.model)
    data = instantiate(cfg.data)
    data.setup_for(system.input_spec())
    data.setup("fit")
    train = data.datasets["train"]
    by_task = {
        task: collate([train[i] for i in range(len(train)) if train[i]["task"] == task][:4], 0)
        for task in ("mt", "passkey")
    }
    losses = {}
    for facts in (data.facts(), dataclasses.replace(data.facts(), task_loss_weight={})):
        system.data_facts = facts
        with torch.no_grad():
            losses[bool(facts.task_loss_weight)] = {
                t: system.training_step(b, 0).item() for t, b in by_task.items()
            }
    assert data.facts().task_loss_weight == {"mt": 3.0}
    assert losses[True]["mt"] == pytest.approx(3 * losses[False]["mt"], rel=1e-5)
    assert losses[True]["passkey"] == pytest.approx(losses[False]["passkey"], rel=1e-6)
    typo = compose_cfg("train", [*overrides, "data.loss_weights={pass: 3.0}"], tmp_path / "t")
    typo_data = instantiate(typo.data)
    typo_data.setup_for(system.input_spec())
    with pytest.raises(ConfigError, match=r"loss_weights=\{'pass': 3.0\} must name training task"):
        typo_data.setup("fit")


def test_speech_ctc_adds_a_weighted_loss_that_trains_the_adapter_not_the_token_table(tmp_path):
    """model.speech_ctc_weight=0.5: every digits clip carries the token ids of its
    transcript; the training loss is the answers' plus 0.5 x the adapter's CTC against them,
    whose gradient reaches the speech adapter and leaves the decoder's token table alone."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from .conftest import compose_cfg

    overrides = [*TINY_FUSION, "data.weights={image: 0, asr: 1, st: 0, mt: 0, passkey: 0}"]
    overrides += ["data.train_size=8", "model.speech_ctc_weight=0.5"]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    system = instantiate(cfg.model).eval()  # no SpecAugment: the same speech in each call
    data = instantiate(cfg.data)
    data.setup_for(system.input_spec())
    data.setup("fit")
    system.data_facts = data.facts()
    batch = collate([data.datasets["train"][i] for i in range(4)], 0)
    said = [ids for per_sample in batch["speech_targets"] for ids in per_sample]
    assert said == [system.tokenizer.encode(answer) for answer in batch["answer"]]  # asr: the text

    speech = system.model.encode_speech(batch["audio"], batch["audio_lengths"])
    ctc = system.speech_ctc_loss(batch, speech)
    loss, n_tokens = system.loss(batch)
    per_batch = system.data_facts.answer_tokens_per_batch
    with torch.no_grad():
        total = system.training_step(batch, 0)
        alone = system.loss(batch, speech=speech)[0]
    assert alone.item() == pytest.approx(loss.item(), rel=1e-6)  # the same speech, spliced in
    assert 0 < ctc.item() < 20
    expected = loss * n_tokens / per_batch + 0.5 * ctc
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    ctc.backward()
    assert system.model.speech_adapter.proj.weight.grad.abs().sum() > 0
    assert system.model.decoder.embed_tokens.weight.grad is None
    with pytest.raises(InstantiationException) as refused:  # Hydra wraps the model's error
        instantiate(cfg.model, speech_ctc_weight=-1.0)
    assert isinstance(refused.value.__cause__, ConfigError)
    assert "speech_ctc_weight=-1.0 must be >= 0" in str(refused.value.__cause__)


def test_merge_along_ctc_gives_one_embedding_per_word_said_and_repeats_stay_apart():
    """Frames read (by cosine to the token table) eight eight _ eight zero zero _ | pad:
    three words, the repeated one twice since a blank parts it; each word is the mean of
    its frames, the clip's other real positions hold the blank's embedding, padding 0."""
    from herd.models.fusion import merge_along_ctc

    table = 3 * torch.eye(4)  # rows: 0 the blank, 1 "eight", 2 "zero", 3 unused
    blank, eight, zero = table[0], table[1], table[2]
    frames = torch.stack([2 * eight, eight, blank, eight, zero, zero, blank, torch.zeros(4)])
    frames = frames[None].clone().requires_grad_()  # [1, 8, 4]
    merged = merge_along_ctc(frames, torch.tensor([7]), table, blank=0)
    assert merged.shape == frames.shape
    assert torch.equal(merged[0, :3], torch.stack([1.5 * eight, eight, zero]))
    assert torch.equal(merged[0, 3:7], blank.expand(4, 4))
    assert torch.equal(merged[0, 7], torch.zeros(4))
    merged.sum().backward()  # each word's frames share its gradient; blanks get none
    assert frames.grad[0, :, 0].tolist() == [0.5, 0.5, 0.0, 1.0, 0.5, 0.5, 0.0, 0.0]


def test_fusion_merge_by_ctc_splices_the_merged_words_and_needs_the_ctc_loss(tmp_path):
    """model.speech.adapter.merge_by_ctc=true: the decoder's input at a clip's placeholders
    is merge_along_ctc of the adapter's embeddings; without the auxiliary CTC loss that
    trains the path it reads, the model is refused with the setting to change."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from herd.models.fusion import merge_along_ctc

    from .conftest import compose_cfg

    overrides = [*TINY_FUSION, "data.weights={image: 0, asr: 1, st: 0, mt: 0, passkey: 0}"]
    overrides += ["data.train_size=4", "model.speech.adapter.merge_by_ctc=true"]
    cfg = compose_cfg("train", [*overrides, "model.speech_ctc_weight=0.5"], tmp_path / "run")
    system = instantiate(cfg.model).eval()
    data = instantiate(cfg.data)
    data.setup_for(system.input_spec())
    data.setup("fit")
    batch = collate([data.datasets["train"][i] for i in range(4)], 0)
    model = system.model
    with torch.no_grad():
        speech, lengths = model.encode_speech(batch["audio"], batch["audio_lengths"])
        embeds = model.embed(batch["input_ids"], batch["audio"], batch["audio_lengths"])
        merged = merge_along_ctc(
            speech, lengths, model.decoder.embed_tokens.weight, model.speech_token_id
        )
    real = torch.arange(speech.shape[1])[None] < lengths[:, None]
    assert torch.equal(embeds[batch["input_ids"] == model.speech_token_id], merged[real])
    with pytest.raises(InstantiationException) as refused:
        instantiate(cfg.model, speech_ctc_weight=0.0)
    assert "set model.speech_ctc_weight > 0" in str(refused.value.__cause__)
