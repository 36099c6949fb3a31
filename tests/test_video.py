"""The video adapter's temporal aggregator: shapes, padding masks, time order, placement."""

from __future__ import annotations

import random

import pytest
import torch

from herd.errors import ConfigError
from herd.models.video import (
    TemporalAggregator,
    TemporalAggregatorConfig,
    video_cross_attention_layer_ids,
)
from herd.models.vision import GatedCrossAttention, cross_attention_layer_ids

from .helpers.generation import recomputed_greedy


def aggregator(**overrides) -> TemporalAggregator:
    torch.manual_seed(0)
    cfg = {"dim": 32, "frames_per_group": 4, "n_latents": 3, "n_layers": 2, "n_heads": 4}
    return TemporalAggregator(TemporalAggregatorConfig(**{**cfg, **overrides})).eval()


@pytest.mark.parametrize(("frames", "group", "groups"), [(8, 4, 2), (10, 4, 3), (6, 1, 6)])
def test_groups_of_consecutive_frames_become_latent_tokens(frames, group, groups):
    model = aggregator(frames_per_group=group)
    tokens, group_mask = model(torch.randn(2, frames, 5, 32))  # [B, F, N, D]
    assert tokens.shape == (2, groups, 3, 32)  # [B, S, L, D]
    assert group_mask.shape == (2, groups) and group_mask.all()
    assert torch.isfinite(tokens).all()


def test_padding_frames_change_nothing_and_empty_groups_are_masked():
    model = aggregator()
    frames = torch.randn(2, 12, 5, 32)
    frame_mask = torch.ones(2, 12, dtype=torch.bool)
    frame_mask[1, 6:] = False  # sample 1 is a 6-frame clip, padded to 12
    with torch.no_grad():
        tokens, group_mask = model(frames, frame_mask)
        noise = frames.clone()
        noise[1, 6:] = torch.randn(6, 5, 32) * 100
        noisy, _ = model(noise, frame_mask)
        alone, _ = model(frames[1:, :6])  # the clip by itself
    assert group_mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(noisy, tokens)
    torch.testing.assert_close(tokens[1, :2], alone[0], atol=1e-5, rtol=1e-5)
    # the same clip in another batch row and beside other clips: the same tokens
    torch.testing.assert_close(tokens[0], model(frames[:1])[0][0], atol=1e-5, rtol=1e-5)


def test_frame_order_within_a_group_is_seen_through_the_frame_embeddings():
    """Attention over a group is blind to order; the frame-index embeddings are what tell
    the frames apart (at initialisation they are small, so the difference is too)."""
    model = aggregator()
    frames = torch.randn(1, 4, 5, 32)
    with torch.no_grad():
        forward, backward = model(frames)[0], model(frames.flip(1))[0]
        assert (forward - backward).abs().max() > 0
        model.frame_embed.zero_()
        torch.testing.assert_close(model(frames)[0], model(frames.flip(1))[0])


def test_gradients_reach_latents_frame_embeddings_and_frames():
    model = aggregator().train()
    frames = torch.randn(2, 8, 5, 32, requires_grad=True)
    tokens, _ = model(frames)
    tokens.square().mean().backward()
    for p in (model.latents, model.frame_embed, frames):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_video_tokens_pass_through_a_gated_cross_attention_that_starts_closed():
    model = aggregator()
    tokens, group_mask = model(torch.randn(2, 8, 5, 32))
    media = tokens.flatten(1, 2)  # [B, S*L, D]
    media_mask = group_mask.repeat_interleave(3, dim=1)  # [B, S*L]
    layer = GatedCrossAttention(32, 4, 2, 64)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x, media, media_mask), x)  # gates at 0


def test_video_layers_sit_before_every_kth_image_cross_attention_layer():
    image_layers = cross_attention_layer_ids(32, 4)  # 3, 7, ..., 31
    assert video_cross_attention_layer_ids(image_layers, 4) == [15, 31]
    assert video_cross_attention_layer_ids([1, 3], 1) == [1, 3]
    with pytest.raises(ConfigError, match="picks none"):
        video_cross_attention_layer_ids([1, 3], 4)


def test_bad_settings_and_too_long_clips_are_named():
    with pytest.raises(ConfigError, match="n_heads"):
        TemporalAggregatorConfig(dim=30, n_heads=4)
    with pytest.raises(ConfigError, match="frames_per_group must be positive"):
        TemporalAggregatorConfig(dim=32, frames_per_group=0)
    with pytest.raises(ValueError, match="longer than the aggregator's max_frames=8"):
        aggregator(max_frames=8)(torch.randn(1, 9, 5, 32))


def test_digit_clips_are_deterministic_stories_of_split_images():
    from herd.data.images import digits_images, digits_split
    from herd.data.video_digits import MAX_FRAMES, QUESTIONS, digit_clips

    clips = digit_clips(40, "test", seed=3, split_seed=42)
    again = digit_clips(40, "test", seed=3, split_seed=42)
    assert all(
        torch.equal(a.frames, b.frames) and a.digits == b.digits
        for a, b in zip(clips, again, strict=True)
    )
    assert [c.digits for c in digit_clips(40, "test", seed=4, split_seed=42)] != [
        c.digits for c in clips
    ]
    images, labels, _ = digits_images(32, 1)
    test_images = images[torch.as_tensor(digits_split(labels, "test", 42))]
    train_images = images[torch.as_tensor(digits_split(labels, "train", 42))]
    for clip in clips:
        assert 8 <= clip.frames.shape[0] <= MAX_FRAMES and 2 <= len(clip.digits) <= 5
        assert clip.frames.shape[1:] == (1, 32, 32) and clip.frames.dtype == torch.uint8
    # an unshifted show frame is a test image, never a training one
    centred = [f for c in clips for f in c.frames if any(torch.equal(f, t) for t in test_images)]
    assert centred and not any(torch.equal(f, t) for f in centred[:20] for t in train_images)

    rng = random.Random(0)
    clip = clips[0]
    words = " ".join(
        ["zero one two three four five six seven eight nine".split()[d] for d in clip.digits]
    )
    assert clip.question("sequence", rng) == ("which digits are shown, in order?", words)
    for task in QUESTIONS:
        question, answer = clip.question(task, rng)
        assert question.endswith("?") and answer


# ----------------------------------------------------------------------------- in the fusion model


def video_fusion():
    """test_fusion's tiny model (bytes tokenizer, cross-attention before every layer) with a
    video adapter: 2-frame groups of 3 latents, a video layer before every image layer."""
    from herd.data.tokenizer import load_tokenizer
    from herd.models.fusion import build_fusion_model
    from herd.models.llama import Llama, LlamaConfig
    from herd.models.vision import ImageEncoder, ImageEncoderConfig

    special = load_tokenizer("bytes").special_ids
    torch.manual_seed(0)
    decoder = Llama(LlamaConfig.from_flavor("tiny", vocab_size=len(special) + 256))
    encoder = ImageEncoder(
        ImageEncoderConfig(
            img_size=16,
            patch_size=4,
            feature_layers=(0,),
            lm_dim=64,
            backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
        )
    )
    model = build_fusion_model(
        decoder,
        special["<|image|>"],
        special["<|speech|>"],
        encoder,
        cross_attention_every=1,
        video_token_id=special["<|video|>"],
        video={"frames_per_group": 2, "n_latents": 3, "n_layers": 1, "n_heads": 4, "every": 1},
    ).eval()
    return model, special["<|video|>"]


def open_all_gates(model, value=1.0):
    for module in model.modules():
        if type(module).__name__ == "TanhGate":
            torch.nn.init.constant_(module.gate, value)


def test_zero_gates_and_no_video_leave_the_fusion_model_unchanged():
    model, video = video_fusion()
    tokens = torch.tensor([[40, video, 41, 42, 43]])
    clip = torch.rand(1, 1, 5, 1, 16, 16)  # [B, V, F, C, H, W]
    with torch.no_grad():
        alone = model.decoder(tokens)
        torch.testing.assert_close(model(tokens, videos=clip), alone)  # gates at 0
        open_all_gates(model)
        text = torch.tensor([[40, 41, 42, 43]])
        torch.testing.assert_close(model(text), model.decoder(text))  # no video: no change
        assert not torch.allclose(model(tokens, videos=clip), alone)  # open: it sees the clip


def test_text_sees_the_video_after_its_placeholder_and_padding_frames_change_nothing():
    model, video = video_fusion()
    open_all_gates(model)
    tokens = torch.tensor([[40, 41, video, 42, 43], [40, 41, video, 42, 43]])
    clips = torch.rand(2, 1, 6, 1, 16, 16)
    frame_mask = torch.ones(2, 1, 6, dtype=torch.bool)
    frame_mask[1, 0, 3:] = False  # the second clip is 3 frames long
    noisy = clips.clone()
    noisy[1, 0, 3:] = torch.rand(3, 1, 16, 16)
    other = clips.clone()
    other[0] = torch.rand(1, 6, 1, 16, 16)
    with torch.no_grad():
        out = model(tokens, videos=clips, frame_mask=frame_mask)
        torch.testing.assert_close(model(tokens, videos=noisy, frame_mask=frame_mask), out)
        short = model(tokens[1:], videos=clips[1:, :, :3])
        torch.testing.assert_close(out[1], short[0], atol=1e-5, rtol=1e-5)
        changed = model(tokens, videos=other, frame_mask=frame_mask)
    torch.testing.assert_close(changed[0, :2], out[0, :2])  # before the placeholder
    assert not torch.allclose(changed[0, 2:], out[0, 2:])  # from it on
    with pytest.raises(ValueError, match=r"<\|video\|> placeholders per sample \[1, 1\] != videos"):
        model(tokens, videos=torch.rand(2, 2, 2, 1, 16, 16))


def test_generation_with_a_video_equals_recomputing_the_whole_sequence():
    model, video = video_fusion()
    open_all_gates(model)
    prompt = torch.tensor([[40, video, 41, 42]])
    clip = torch.rand(1, 1, 4, 1, 16, 16)
    out = model.generate(prompt, 4, videos=clip)
    assert out == recomputed_greedy(model, prompt, 4, videos=clip)


TINY_VIDEO = [
    "experiment=video_digits",
    "model.language.llama.flavor=tiny",
    "++model.vision.encoder={patch_size: 8, feature_layers: [0],"
    " backbone_kwargs: {embed_dim: 32, depth: 2, num_heads: 2}}",
    "model.video={frames_per_group: 4, n_latents: 4, n_layers: 1, n_heads: 2, every: 1}",
    "model.max_new_tokens=12",
    "data.train_size=200",
    "data.video_train=60",
    "data.val_per_task=2",
    "data.test_per_task=3",
    "data.batch_size=4",
    "trainer.max_steps=12",
    "model.scheduler.warmup_steps=2",
    "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_summary=null",
]


@pytest.mark.slow
def test_a_short_real_video_run_writes_every_metric_and_reopens(tmp_path):
    import json
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from herd.systems.common import load_system
    from herd.train import train

    from .conftest import compose_cfg

    cfg = compose_cfg("train", TINY_VIDEO, tmp_path / "run")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    saved = json.loads((run / "metrics.json").read_text())
    for name in ("wer_video", "count_acc", "first_acc", "loss"):
        assert f"test/{name}" in saved, name
    for name in ("wer_video", "count_acc", "first_acc"):  # the trivial baselines beside them
        assert any(k.startswith(f"test/{name}") and k != f"test/{name}" for k in saved), name
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    assert "samples/video_video_count_0" in events.Tags()["images"]  # the frames, in a grid
    assert "samples/answers_test/text_summary" in events.Tags()["tensors"]
    system = load_system(run / "checkpoints" / "last.ckpt")
    assert system.model.video_aggregator is not None and system.model.speech_encoder is None


def test_a_decoder_without_a_video_token_is_named(tmp_path):
    from herd.systems.fusion import FusionSystem

    with pytest.raises(ConfigError, match=r"has no <\|video\|> token \(tokenizer bytes\)"):
        FusionSystem(
            language={"llama": {"flavor": "tiny", "vocab_size": 264}, "tokenizer": "bytes"},
            vision={"encoder": {"img_size": 16, "patch_size": 8, "lm_dim": 64}},
            video={"frames_per_group": 2, "n_latents": 2, "n_layers": 1, "n_heads": 2},
        )


def test_a_video_fusion_model_exports_and_reopens_to_the_same_outputs(tmp_path):
    from herd.data.tokenizer import VIDEO
    from herd.systems.fusion import FusionSystem
    from herd.systems.fusion_export import save_fusion_export

    context = {"max_seq_len": 128, "rope_scaling": None}
    torch.manual_seed(0)
    system = FusionSystem(
        language={"llama": {"flavor": "tiny", **context}, "tokenizer": "herd_bpe"},
        vision={"encoder": {"patch_size": 8, "feature_layers": [0], "lm_dim": 64}},
        video={"frames_per_group": 2, "n_latents": 2, "n_layers": 1, "n_heads": 2, "every": 1},
        cross_attention_every=1,
    ).eval()
    with torch.no_grad():  # trained-looking: open gates, moved weights
        for p in system.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokens = torch.tensor([[5, system.tokenizer.special_ids[VIDEO], 300, 301, 302]])
    clip = torch.rand(1, 1, 5, 1, 32, 32) * 2 - 1
    out = save_fusion_export(system, tmp_path / "export", "all")
    reopened = FusionSystem(language={"llama": context}, init_from=str(out)).eval()
    assert reopened.hparams.video == system.hparams.video
    with torch.no_grad():
        expected = system.model(tokens, videos=clip)
        torch.testing.assert_close(reopened.model(tokens, videos=clip), expected)


def test_video_gates_learn_at_the_gate_rate_and_finetune_video_trains_only_the_adapter():
    """The video cross-attention gates start closed like the image ones, so they get the
    same gate_lr_multiplier; finetune=video's frozen parts leave only the video adapter."""
    from herd.models.vision import TanhGate
    from herd.systems.common import decay_param_groups
    from herd.systems.fusion import FusionSystem

    torch.manual_seed(0)
    system = FusionSystem(
        language={"llama": {"flavor": "tiny", "max_seq_len": 128}, "tokenizer": "herd_bpe"},
        vision={"encoder": {"patch_size": 8, "feature_layers": [0], "lm_dim": 64}},
        video={"frames_per_group": 2, "n_latents": 2, "n_layers": 1, "n_heads": 2, "every": 1},
        cross_attention_every=1,
        gate_lr_multiplier=30.0,
        finetune={
            "strategy": "adapter",
            "frozen": ["image_encoder", "image_projection", "cross_attention"],
        },
    )
    model = system.model
    groups = decay_param_groups(system, 0.1, system.lr_multipliers())
    scaled = {id(p): g.get("lr_scale", 1.0) for g in groups for p in g["params"]}
    gates = [m.gate for m in model.video_cross_attention.modules() if isinstance(m, TanhGate)]
    assert gates and all(scaled[id(g)] == 30.0 for g in gates)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"video_aggregator", "video_cross_attention"}


def test_a_fusion_checkpoint_without_video_gains_the_adapter_its_layers_copied_from_image(
    tmp_path,
):
    """model.init_from=FUSION.ckpt with model.video: every weight of the source, a fresh
    aggregator, and (init=image) video cross-attention layers that start as the image ones
    they precede, gates closed, so the model still computes the source's outputs."""
    import lightning as L

    from herd.data.tokenizer import VIDEO
    from herd.systems.fusion import FusionSystem

    context = {"max_seq_len": 128, "rope_scaling": None}
    vision = {"encoder": {"patch_size": 8, "feature_layers": [0], "lm_dim": 64}}
    torch.manual_seed(0)
    source = FusionSystem(
        language={"llama": {"flavor": "tiny", **context}, "tokenizer": "herd_bpe"},
        vision=vision,
        cross_attention_every=1,
    )
    with torch.no_grad():  # a trained-looking source: open gates, moved weights
        for p in source.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(source)
    trainer.save_checkpoint(tmp_path / "fusion.ckpt")

    video = {"frames_per_group": 2, "n_latents": 2, "n_layers": 1, "n_heads": 2, "every": 2}
    for init in ("random", "image"):
        gained = FusionSystem(
            language={"llama": context},
            init_from=str(tmp_path / "fusion.ckpt"),
            video={**video, "init": init},
        ).eval()
        model = gained.model
        assert model.video_aggregator is not None and list(model.video_cross_attention) == ["1"]
        theirs = source.model.state_dict()
        for k, v in model.state_dict().items():
            assert not k.startswith("video_") or k not in theirs
            assert k.startswith("video_") or torch.equal(v, theirs[k]), k
        copied = model.video_cross_attention["1"].state_dict()
        image = source.model.cross_attention["1"].state_dict()
        same = [torch.equal(copied[k], image[k]) for k in image if not k.endswith("_gate.gate")]
        assert all(same) if init == "image" else not any(same)
        assert [float(v) for k, v in copied.items() if k.endswith("_gate.gate")] == [0.0, 0.0]
        tokens = torch.tensor([[5, gained.tokenizer.special_ids[VIDEO], 300, 301]])
        clip = torch.rand(1, 1, 4, 1, 32, 32) * 2 - 1
        with torch.no_grad():  # closed video gates: the source's outputs
            torch.testing.assert_close(model(tokens, videos=clip), source.model.eval()(tokens))
    with pytest.raises(ConfigError, match="model.video.init='imag'"):
        FusionSystem(
            language={"llama": context},
            init_from=str(tmp_path / "fusion.ckpt"),
            video={**video, "init": "imag"},
        )
