"""Vision: image encoder features, the gated cross-attention adapter on a frozen Llama,
image data (digits, folders, manifests, bad files) and a real VisionSystem run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from herd.data.images import ImageDataModule, load_image
from herd.errors import ConfigError, DataError
from herd.models.fusion import build_fusion_model
from herd.models.llama import Llama, LlamaConfig
from herd.models.vision import GatedCrossAttention, ImageEncoder, ImageEncoderConfig, TanhGate

from .conftest import compose_cfg, run_cli

# A ViT small enough for unit tests: 32 px, 8 px patches -> a 4x4 grid of 16 tokens.
TINY_VIT = ImageEncoderConfig(
    backbone="vit_tiny_patch16_224",
    img_size=32,
    in_chans=1,
    patch_size=8,
    backbone_kwargs={"embed_dim": 32, "depth": 4, "num_heads": 2},
    feature_layers=(0, 2),
    n_gated_layers=1,
    gated_heads=2,
    lm_dim=64,  # the "tiny" Llama's width
)


def tiny_llama(n_layers: int = 8) -> Llama:
    return Llama(LlamaConfig.from_flavor("tiny", n_layers=n_layers)).eval()


# ----------------------------------------------------------------------------- encoder


def test_vit_features_are_the_configured_layers_plus_the_final_one():
    encoder = ImageEncoder(TINY_VIT)
    images = torch.randn(2, 1, 32, 32)
    maps, final = encoder.intermediates(images)
    assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 2  # blocks 0 and 2, on the patch grid
    assert final.shape == (2, 32, 4, 4)  # class token dropped
    assert encoder.num_tokens == 16 and encoder.feature_dim == 3 * 32
    assert encoder.features(images).shape == (2, 16, 96)
    assert encoder(images).shape == (2, 16, 64)


def test_cnn_features_are_pooled_to_one_token_grid():
    cfg = ImageEncoderConfig(
        backbone="resnet18", patch_size=None, feature_layers=(1, 2, 3), token_grid=4, lm_dim=64
    )
    encoder = ImageEncoder(cfg)
    images = torch.randn(2, 1, 32, 32)
    maps, final = encoder.intermediates(images)
    # ResNet stages at 32 px: layer1 /4, layer2 /8, layer3 /16; final = layer4 at /32
    assert [m.shape for m in maps] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert final.shape == (2, 512, 1, 1)
    assert encoder.num_tokens == 16 and encoder.feature_dim == 64 + 128 + 256 + 512
    assert encoder.features(images).shape == (2, 16, 960)
    assert encoder(images).shape == (2, 16, 64)


def test_encoder_config_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"has 4 feature layers .* feature_layers \[7\]"):
        ImageEncoder(ImageEncoderConfig(**{**TINY_VIT.__dict__, "feature_layers": (1, 7)}))
    with pytest.raises(ConfigError, match="distinct"):
        ImageEncoderConfig(feature_layers=(3, 3))
    with pytest.raises(ConfigError, match="could not build backbone 'no_such_net'"):
        ImageEncoder(ImageEncoderConfig(backbone="no_such_net"))


def test_vit_h14_flavor_builds_on_the_meta_device(tmp_path):
    cfg = compose_cfg(
        "train",
        [
            "experiment=vision_digits",
            "model=vision/vit_h14",
            "data.channels=3",
            "data.image_size=224",
        ],
        tmp_path / "run",
    )
    try:
        with torch.device("meta"):
            system = hydra.utils.instantiate(cfg.model, _recursive_=False)
    finally:
        GlobalHydra.instance().clear()
    encoder = system.model
    assert len(encoder.backbone.blocks) == 32 and encoder.backbone.embed_dim == 1280
    assert encoder.config.feature_layers == (3, 7, 15, 23, 30)
    assert len(encoder.gated_layers) == 8
    assert encoder.feature_dim == 6 * 1280  # 7680, as in the Llama 3 paper
    assert encoder.num_tokens == 256 and encoder.projection.out_features == 4096
    assert next(encoder.parameters()).is_meta


# ----------------------------------------------------------------------------- adapter


IMAGE_ID = 500  # a token id standing for <|image|> in these tests


def with_adapter(llama: Llama, every: int = 4):
    """The decoder composed with an image encoder and cross-attention (no speech)."""
    return build_fusion_model(
        llama, IMAGE_ID, 501, ImageEncoder(TINY_VIT), cross_attention_every=every
    )


def test_untrained_adapter_leaves_logits_bit_identical():
    llama = tiny_llama()
    tokens = torch.randint(0, 400, (2, 12))
    tokens[:, 2] = IMAGE_ID  # text from position 2 on sees the image
    images = torch.randn(2, 1, 1, 32, 32)  # [B, I, C, H, W]
    with torch.no_grad():
        before = llama(tokens)
        fusion = with_adapter(llama).eval()
        assert fusion.cross_attention_layers == [3, 7]  # before layers 3, 7 (0-indexed)
        assert torch.equal(fusion(tokens, images=images), before)
        assert torch.equal(fusion(tokens), before)
        # the media do reach the model once the gates open
        for gate in fusion.cross_attention.modules():
            if isinstance(gate, TanhGate):
                gate.gate.fill_(0.5)
        assert not torch.equal(fusion(tokens, images=images), before)


def test_text_rows_that_see_no_image_are_unchanged_even_with_open_gates():
    layer = GatedCrossAttention(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=128)
    with torch.no_grad():
        layer.attn_gate.gate.fill_(1.0)
        layer.mlp_gate.gate.fill_(1.0)
    x, media = torch.randn(2, 5, 64), torch.randn(2, 3, 64)
    mask = torch.ones(2, 5, 3, dtype=torch.bool)  # [B, T, N]: text 0-1 come before the image
    mask[:, :2] = False
    out = layer(x, media, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :2], x[:, :2])
    assert not torch.allclose(out[:, 2:], x[:, 2:])


def test_adapter_training_trains_adapter_and_encoder_and_never_the_language_model():
    llama = tiny_llama(n_layers=4)
    fusion = with_adapter(llama, every=2)
    for p in llama.parameters():
        p.requires_grad_(False)
    language = {n: p.detach().clone() for n, p in llama.named_parameters()}
    adapter = {n: p.detach().clone() for n, p in fusion.cross_attention.named_parameters()}
    encoder_before = {n: p.detach().clone() for n, p in fusion.image_encoder.named_parameters()}

    trainable = [p for p in fusion.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    tokens = torch.randint(0, 400, (2, 10))
    tokens[:, 0] = IMAGE_ID
    images = torch.randn(2, 1, 1, 32, 32)
    for _ in range(3):  # step 1 opens the gates; later steps reach everything behind them
        optimizer.zero_grad()
        logits = fusion(tokens[:, :-1], images=images)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        for name, p in llama.named_parameters():
            assert p.grad is None, f"{name} received a gradient"
        optimizer.step()

    assert all(torch.equal(p, language[n]) for n, p in llama.named_parameters())
    params = dict(fusion.cross_attention.named_parameters())
    unchanged = [n for n, before in adapter.items() if torch.equal(params[n], before)]
    assert not unchanged, f"adapter parameters that did not train: {unchanged}"
    encoder = fusion.image_encoder
    moved = [n for n, p in encoder.named_parameters() if not torch.equal(p, encoder_before[n])]
    assert len(moved) > 0.9 * len(encoder_before)
    assert any(n.startswith("projection") for n in moved)
    assert any(n.startswith("backbone.blocks") for n in moved)


def test_composing_leaves_the_language_model_as_it_was():
    llama = tiny_llama()
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    modules = [type(m) for m in llama.modules()]
    encoder = ImageEncoder(replace_lm_dim(TINY_VIT, 32))  # another width: a new projection
    projection = encoder.projection
    fusion = build_fusion_model(llama, IMAGE_ID, 501, encoder, cross_attention_every=4)
    assert fusion.decoder is llama and fusion.image_encoder is encoder
    assert [type(m) for m in llama.modules()] == modules  # no layer wrapped or replaced
    assert list(llama.state_dict()) == list(state)
    assert all(torch.equal(llama.state_dict()[k], v) for k, v in state.items())
    assert encoder.projection is projection and encoder.config.lm_dim == 32
    assert fusion.image_projection.out_features == 64
    # the stage weights load into the composed model by prefix
    fused = fusion.state_dict()
    assert all(torch.equal(fused[f"decoder.{k}"], v) for k, v in state.items())
    assert (
        "cross_attention.3.q_proj.weight" in fused and "cross_attention.7.attn_gate.gate" in fused
    )


def replace_lm_dim(cfg: ImageEncoderConfig, lm_dim: int) -> ImageEncoderConfig:
    from dataclasses import replace

    return replace(cfg, lm_dim=lm_dim)


# ----------------------------------------------------------------------------- data


def test_digits_split_is_fixed_stratified_and_normalised():
    data = ImageDataModule(image_size=32, batch_size=32, seed=7, augment=None)
    data.setup("fit")
    sizes = {k: len(v) for k, v in data.datasets.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.15 * 1797, abs=2)
    assert torch.bincount(data.datasets["test"].labels).min() >= 25  # every digit held out
    again = ImageDataModule(image_size=32, batch_size=32, seed=7)
    again.setup("fit")
    assert torch.equal(again.datasets["test"].labels, data.datasets["test"].labels)
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (32, 1, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    refs = data.reference_metrics()
    assert 0.09 < refs["test/chance_top1"] < 0.12 and 0.45 < refs["test/chance_top5"] < 0.55


def write_images(root: Path) -> dict[str, Path]:
    """One small image per mode: grayscale, RGB, RGBA (transparent), palette."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "gray": Image.new("L", (10, 12), 200),
        "rgb": Image.new("RGB", (16, 16), (255, 0, 0)),
        "rgba": Image.new("RGBA", (16, 16), (0, 0, 0, 0)),
        "palette": Image.new("P", (16, 16), 3),
    }
    paths = {}
    for name, image in files.items():
        paths[name] = root / f"{name}.png"
        image.save(paths[name])
    return paths


def test_grayscale_rgb_and_rgba_are_converted_to_the_encoder_channels(tmp_path):
    paths = write_images(tmp_path)
    gray = load_image(paths["gray"], 8, channels=3)
    assert gray.shape == (3, 8, 8) and (gray == 200).all()
    red = load_image(paths["rgb"], 8, channels=1)
    assert red.shape == (1, 8, 8) and (red == 76).all()  # ITU-R 601 luma of pure red
    transparent = load_image(paths["rgba"], 8, channels=3)
    assert (transparent == 255).all()  # composited onto white
    assert load_image(paths["palette"], 8, channels=1).shape == (1, 8, 8)


def write_manifest(tmp_path: Path) -> Path:
    paths = write_images(tmp_path / "img")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not really an image")
    lines = [
        {"image": "img/gray.png", "label": "cat"},
        {"image": "img/rgb.png", "label": "dog"},
        {"image": "img/missing.png", "label": "dog"},  # line 3: no such file
        {"image": "img/rgba.png", "label": "cat"},
        {"image": "img/broken.png", "label": "cat"},  # line 5: corrupt
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n"  # line 6
    text += json.dumps({"image": "img/palette.png"}) + "\n"  # line 7: no label
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(text)
    assert paths
    return manifest


def manifest_data(path: Path, **overrides) -> ImageDataModule:
    kwargs = dict(source="manifest", path=str(path), image_size=8, batch_size=1)
    kwargs.update(val_fraction=0.25, test_fraction=0.0, num_classes=2, augment=None)
    return ImageDataModule(**{**kwargs, **overrides})


def test_bad_manifest_lines_and_images_name_the_file_and_line(tmp_path):
    manifest = write_manifest(tmp_path)
    with pytest.raises(DataError, match=r"manifest.jsonl, line 6: Expecting property name"):
        manifest_data(manifest).setup("fit")
    good_json = tmp_path / "files.jsonl"
    good_json.write_text("".join(manifest.read_text().splitlines(keepends=True)[:5]))
    with pytest.raises(
        DataError, match=r"files.jsonl, line 3: .*missing.png: file does not exist\."
    ):
        manifest_data(good_json).setup("fit")
    corrupt = tmp_path / "corrupt.jsonl"
    lines = good_json.read_text().splitlines(keepends=True)
    corrupt.write_text("".join(lines[:2] + lines[3:]))
    with pytest.raises(DataError, match=r"corrupt.jsonl, line 4: .*broken.png: cannot read image"):
        manifest_data(corrupt).setup("fit")
    with pytest.raises(DataError, match=r"does not exist"):
        manifest_data(tmp_path / "nope.jsonl").setup("fit")


def test_skip_mode_skips_and_counts_bad_samples(tmp_path, caplog):
    manifest = write_manifest(tmp_path)
    data = manifest_data(manifest, skip_bad_samples=True)
    with caplog.at_level(logging.WARNING, logger="herd.data.images"):
        data.setup("fit")
    assert data.num_skipped == 2  # missing + corrupt images
    assert "Skipped 2 bad line(s)" in caplog.text  # bad JSON + missing label
    assert "Skipped 2 unreadable image(s)" in caplog.text
    assert data.class_names == ["cat", "dog"]
    assert sum(len(d) for d in data.datasets.values()) == 3


def test_image_folder_layout(tmp_path):
    for label, value in (("one", 10), ("two", 240)):
        for i in range(4):
            Image.new("L", (8, 8), value + i).save(tmp_path / f"{label}_{i}.png")
            (tmp_path / "root" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / f"{label}_{i}.png").rename(tmp_path / "root" / label / f"{i}.png")
    data = ImageDataModule(
        source="folder", path=str(tmp_path / "root"), image_size=8, num_classes=2, batch_size=2
    )
    data.setup("fit")
    assert data.class_names == ["one", "two"]
    assert sum(len(d) for d in data.datasets.values()) == 8
    with pytest.raises(ConfigError, match="2 classes .* data.num_classes=1"):
        ImageDataModule(
            source="folder", path=str(tmp_path / "root"), image_size=8, num_classes=1
        ).setup("fit")


def test_cli_prints_one_line_for_a_bad_manifest(tmp_path):
    manifest = write_manifest(tmp_path)
    result = run_cli(
        "herd.train",
        "experiment=vision_digits",
        "data.source=manifest",
        f"data.path={manifest}",
        "data.num_classes=2",
        log_dir=tmp_path / "logs",
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("herd: error: ") and "manifest.jsonl, line 6:" in last
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
def test_short_vision_run_beats_chance_and_leaves_a_complete_run_dir(tmp_path):
    from herd.models.vision import ImageEncoder as Encoder
    from herd.systems.common import load_system
    from herd.systems.vision import VisionSystem
    from herd.train import train

    cfg = compose_cfg(
        "train",
        [
            "experiment=vision_digits",
            # a smaller ViT than the default (seconds, not minutes, on a shared 2-core CPU)
            "model.encoder.backbone_kwargs.embed_dim=64",
            "model.encoder.backbone_kwargs.depth=2",
            "model.encoder.backbone_kwargs.num_heads=2",
            "model.encoder.feature_layers=[0]",
            "model.encoder.n_gated_layers=1",
            "model.encoder.gated_heads=2",
            "model.encoder.lm_dim=64",
            "model.optimizer.lr=3e-3",
            "model.scheduler.warmup_steps=10",
            "trainer.max_steps=250",
            "trainer.val_check_interval=125",
            "trainer.enable_progress_bar=false",
            "callbacks.model_summary=null",
        ],
        tmp_path / "run",
    )
    try:
        metrics = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    run_dir = Path(cfg.paths.output_dir)
    assert metrics["test/top1"] > 0.6 > 3 * metrics["test/chance_top1"]
    assert metrics["test/top5"] >= metrics["test/top1"]
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    for key in ("val/loss", "val/top1", "val/top5", "test/top1", "test/top5", "test/chance_top1"):
        assert key in on_disk

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/top1", "test/top1"):
        assert tag in tags["scalars"], f"{tag} missing from TensorBoard"
    assert {"perf/images_per_sec", "perf/tflops"} <= set(tags["scalars"])  # FLOPs: counted
    assert len(acc.Images("samples/predictions")) == 2  # one per validation
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(tags["images"])

    # the checkpoint reopens with weights-only loading; the fusion stage takes .model
    system = load_system(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(system, VisionSystem) and isinstance(system.model, Encoder)
    assert system.model(torch.zeros(1, 1, 32, 32)).shape == (1, 16, 64)  # 4x4 patches


def test_the_digits_take_one_split_that_every_stage_follows():
    from herd.data.images import digits_images, digits_split

    with pytest.raises(ConfigError, match=r"digits are split 0.15 / 0.15 for every stage"):
        ImageDataModule(source="digits", val_fraction=0.2)
    data = ImageDataModule(source="digits", image_size=8, split_seed=7, augment=None)
    data.setup("fit")
    images, labels, _ = digits_images(8, 1)
    # the fusion and review stages draw their images with digits_split: the same held-out set
    for split in ("train", "val", "test"):
        expected = images[torch.from_numpy(digits_split(labels, split, 7))]
        assert torch.equal(data.datasets[split].images, expected), split


def test_herd_eval_keeps_the_checkpoints_split_unless_told(tmp_path):
    from herd.evaluate import resolve_data_config

    header = {
        "config": {"split_seed": 7},
        "data": {"source": "digits", "split_seed": "${split_seed}"},
    }
    for given, expected in ((None, 7), (3, 3)):
        cfg = compose_cfg("eval", ["ckpt_path=x", f"split_seed={given or 'null'}"], tmp_path)
        resolve_data_config(cfg, header)
        assert cfg.data.split_seed == expected
