"""Llama 3.2 Vision (Hugging Face `mllama`) parts against transformers, on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from herd.models.mllama_vision import MllamaVisionConfig, MllamaVisionEncoder

transformers = pytest.importorskip("transformers")

TINY_VISION = dict(
    hidden_size=32,
    num_hidden_layers=4,
    num_global_layers=2,
    attention_heads=4,
    intermediate_size=64,
    image_size=28,  # 4 x 4 patches of 7 px + the class token: 17, padded to 24
    patch_size=7,
    max_num_tiles=4,
    intermediate_layers_indices=[1, 3],
)


def hf_vision(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.MllamaVisionConfig(**TINY_VISION, vision_output_dim=96)
    config._attn_implementation = "eager"
    model = transformers.MllamaVisionModel(config).eval()
    with torch.no_grad():  # gates away from 0, so that every gated path counts
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.7)
    return model


def test_the_vision_encoder_equals_transformers():
    reference = hf_vision()
    ours = MllamaVisionEncoder(MllamaVisionConfig(**TINY_VISION)).eval()
    ours.load_state_dict(reference.state_dict())  # strict: the released parameter names
    # two samples: two images (4 tiles as 2x2, 2 tiles as 1x2), then one image (1 tile) and a
    # missing one
    pixels = torch.randn(2, 2, 4, 3, 28, 28)
    ids = torch.tensor([[6, 2], [1, 0]])
    mask = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]])
    for b, i in ((0, 1), (1, 0), (1, 1)):  # what the processor leaves in unused tiles
        pixels[b, i, int(mask[b, i].sum()) :] = 0
    with torch.no_grad():
        expected = reference(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask)
        got = ours(pixels, ids, mask)
    assert got.shape == (2, 2, 4, 17, 96)
    torch.testing.assert_close(got, expected.last_hidden_state, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the whole model

TINY_TEXT = dict(
    vocab_size=300,  # <|image|> = 300, the first of the 8 extra embedding rows
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    cross_attention_layers=[1, 4],  # the last decoder layer is a cross-attention one
    max_position_embeddings=256,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    pad_token_id=None,
    bos_token_id=1,
    eos_token_id=2,
)
# a vision width that is not a power of two (36 = 4 heads of 9)
TINY_MLLAMA_VISION = dict(TINY_VISION, hidden_size=36, vision_output_dim=108)
IMAGE = 300


def hf_mllama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.MllamaConfig(
        text_config=TINY_TEXT, vision_config=TINY_MLLAMA_VISION, image_token_index=IMAGE
    )
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = transformers.MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():  # gates away from 0 and a bias, so that every path counts
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.7)
            if "multi_modal_projector.bias" in name:
                p.normal_()
    return model


def mllama_inputs():
    """Two samples, text before, between and after their images: sample 0 holds two images
    (2x2 and 1x2 tiles), sample 1 one image (1 tile) and a padding image slot. A token sees
    the image it follows most recently (the processor's rule); tokens before the first
    image see none."""
    torch.manual_seed(1)
    tokens = torch.randint(3, 300, (2, 14))
    tokens[0, 2], tokens[0, 8], tokens[1, 5] = IMAGE, IMAGE, IMAGE
    pixels = torch.randn(2, 2, 4, 3, 28, 28)
    ids = torch.tensor([[6, 2], [1, 0]])
    tiles = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]])
    for b, i in ((0, 1), (1, 0), (1, 1)):
        pixels[b, i, int(tiles[b, i].sum()) :] = 0
    cross = torch.zeros(2, 14, 2, 4, dtype=torch.long)
    cross[0, 2:8, 0] = tiles[0, 0]
    cross[0, 8:, 1] = tiles[0, 1]
    cross[1, 5:, 0] = tiles[1, 0]
    return dict(
        input_ids=tokens,
        pixel_values=pixels,
        aspect_ratio_ids=ids,
        aspect_ratio_mask=tiles,
        cross_attention_mask=cross,
    )


def hf_logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A tiny random Llama 3.2 Vision checkpoint as transformers writes it, and the model."""
    reference = hf_mllama()
    path = tmp_path_factory.mktemp("mllama") / "hf"
    reference.save_pretrained(path)
    return path, reference


def test_the_released_model_loads_with_equal_logits(released):
    from herd.models.pretrained_mllama import load_pretrained_mllama

    path, reference = released
    ours = load_pretrained_mllama(path).eval()
    assert [int(j) for j in ours.cross_attention] == [1, 3]  # before layer 1, after the last
    inputs = mllama_inputs()
    expected = hf_logits(reference, **inputs)
    with torch.no_grad():
        got = ours(**inputs)
    assert got.shape == (2, 14, 300)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # no image: the cross-attention layers are skipped, the text model alone
    with torch.no_grad():
        text_only = ours(input_ids=inputs["input_ids"])
    torch.testing.assert_close(
        text_only, hf_logits(reference, input_ids=inputs["input_ids"]), atol=1e-4, rtol=1e-4
    )
    assert not torch.allclose(text_only, got, atol=1e-3)


def test_the_release_lets_rows_before_any_image_attend_to_every_image(released):
    """Rows that see no tile keep an attention update in the release (only their MLP branch
    is zeroed), so images change the text before them; herd's own fusion model (False)
    leaves such rows exactly as the decoder alone computes them."""
    from herd.models.pretrained_mllama import load_pretrained_mllama

    ours = load_pretrained_mllama(released[0]).eval()
    inputs = mllama_inputs()
    with torch.no_grad():
        with_images = ours(**inputs)
        text_only = ours(input_ids=inputs["input_ids"])
        assert not torch.allclose(with_images[:, :2], text_only[:, :2], atol=1e-4)
        for layer in ours.cross_attention.values():
            layer.blind_rows_attend_all = False
        blind = ours(**inputs)
    torch.testing.assert_close(blind[0, :2], text_only[0, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blind[1, :5], text_only[1, :5], atol=1e-5, rtol=1e-5)


def test_export_round_trips_through_transformers(released, tmp_path):
    from herd.models.pretrained_mllama import load_pretrained_mllama, save_hf_mllama

    ours = load_pretrained_mllama(released[0]).eval()
    save_hf_mllama(ours, tmp_path / "out", max_shard_bytes=200_000)  # sharded
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    inputs = mllama_inputs()
    with torch.no_grad():
        ours_logits = ours(**inputs)
    torch.testing.assert_close(hf_logits(back, **inputs), ours_logits, atol=1e-5, rtol=1e-5)
    again = load_pretrained_mllama(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs), ours_logits, atol=0, rtol=0)


def test_bad_mllama_checkpoints_are_refused_naming_the_culprit(released, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from herd.errors import ConfigError
    from herd.models.pretrained_mllama import load_pretrained_mllama, save_hf_mllama

    path = released[0]
    wrong_type = shutil.copytree(path, tmp_path / "type")
    config = json.loads((wrong_type / "config.json").read_text())
    (wrong_type / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(ConfigError, match="model_type 'llama' is not 'mllama'"):
        load_pretrained_mllama(wrong_type)

    shape = shutil.copytree(path, tmp_path / "shape")
    state = load_file(shape / "model.safetensors")
    key = "multi_modal_projector.weight"
    state[key] = state[key][:, :100].contiguous()
    save_file(state, shape / "model.safetensors")
    with pytest.raises(ConfigError, match=r"multi_modal_projector.weight has shape \(48, 100\)"):
        load_pretrained_mllama(shape)

    sharded = save_hf_mllama(load_pretrained_mllama(path), tmp_path / "shards", 200_000)
    last = sorted(sharded.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(ConfigError, match=f"Shard .*{last.name} listed in .* is missing"):
        load_pretrained_mllama(sharded)


def test_the_adapter_recipe_trains_exactly_the_vision_adapter(released):
    from herd.models.pretrained_mllama import load_pretrained_mllama
    from herd.systems.finetune import apply_finetune_strategy

    model = load_pretrained_mllama(released[0]).train()
    counts = apply_finetune_strategy(model, "adapter")
    inputs = mllama_inputs()
    model(**inputs).logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    adapter = {
        n
        for n, _ in model.named_parameters()
        if n.split(".")[0] in ("vision_model", "multi_modal_projector", "cross_attention")
    }
    # every adapter parameter but the unused padding-image embedding rows gets a gradient
    assert trained <= adapter and all(model.get_parameter(n).requires_grad for n in adapter)
    assert {n.split(".")[0] for n in trained} == {
        "vision_model",
        "multi_modal_projector",
        "cross_attention",
    }
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert counts["frozen"] == sum(p.numel() for p in model.decoder.parameters())


# ----------------------------------------------------------------- fine-tuning the release


def test_the_release_as_a_fusion_model_computes_the_released_logits(released):
    """fusion_model_from_mllama: an image given as the fusion stage gives it (a square tile in
    [-1, 1]) yields transformers' logits for the same image through the release's processor
    path (herd.data.mllama_images: one tile, aspect-ratio id 1), rows before it included."""
    from herd.data.mllama_images import mllama_pixel_batch
    from herd.models.mllama import fusion_model_from_mllama
    from herd.models.pretrained_mllama import load_pretrained_mllama

    path, reference = released
    fusion = fusion_model_from_mllama(load_pretrained_mllama(path), speech_token_id=299).eval()
    torch.manual_seed(3)
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(3, 299, (1, 10))
    tokens[0, 3] = IMAGE
    pixels = mllama_pixel_batch([[image]], tile=28, max_tiles=4)
    cross = torch.zeros(1, 10, 1, 4, dtype=torch.long)
    cross[0, 3:, 0, 0] = 1  # the processor's mask: from the image on, its one tile
    expected = hf_logits(
        reference,
        input_ids=tokens,
        pixel_values=pixels["pixel_values"],
        aspect_ratio_ids=pixels["aspect_ratio_ids"],
        aspect_ratio_mask=pixels["aspect_ratio_mask"],
        cross_attention_mask=cross,
    )
    assert pixels["aspect_ratio_ids"].tolist() == [[1]]
    with torch.no_grad():
        got = fusion(tokens, images=(image.float() / 127.5 - 1)[None, None])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


RELEASE_IMAGE_ID = 4097  # after the bundled BPE's 4096 tokens and its <|video|>


def tiny_mllama_with_tokenizer(path):
    """A tiny random Llama 3.2 Vision in the Hugging Face layout whose tokenizer is herd's
    bundled BPE with <|image|> after the text vocabulary, where the release has it (128256
    there, RELEASE_IMAGE_ID here); the bundled <|image|> row becomes a reserved token."""
    import json
    from importlib.resources import files

    torch.manual_seed(0)
    text = dict(TINY_TEXT, vocab_size=RELEASE_IMAGE_ID, bos_token_id=0, eos_token_id=1)
    config = transformers.MllamaConfig(
        text_config=text, vision_config=TINY_MLLAMA_VISION, image_token_index=RELEASE_IMAGE_ID
    )
    transformers.MllamaForConditionalGeneration(config).save_pretrained(path)
    bundled = (files("herd.assets") / "tokenizers" / "python_docs_bpe_4k.json").read_text()
    tokenizer = json.loads(bundled.replace('"<|image|>"', '"<|reserved_special_token_10|>"'))
    tokenizer["added_tokens"].append(
        {
            "id": RELEASE_IMAGE_ID,
            "content": "<|image|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["adapter", "lora"])
def test_the_release_fine_tunes_through_the_fusion_stage(tmp_path, strategy):
    """experiment=vision_llama32_11b on a tiny random release: the fusion stage trains it with
    the paper's adapter recipe (or LoRA), scores the digits tasks, records what trained, and
    its checkpoint reopens without the release's weights."""
    import json

    from herd.callbacks.trained_parameters import read_summary
    from herd.models.mllama import MllamaImageEncoder
    from herd.systems.common import load_system
    from herd.train import train

    from .conftest import compose_cfg

    release = tiny_mllama_with_tokenizer(tmp_path / "release")
    overrides = [
        "experiment=vision_llama32_11b",
        f"pretrained={release}",
        f"finetune={strategy}",
        "precision=fp32",
        "data.train_size=48",
        "data.val_per_task=2",
        "data.test_per_task=3",
        "data.batch_size=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "model.max_new_tokens=4",
        "model.optimizer.lr=1e-3",
        "model.scheduler.warmup_steps=1",
        "trainer.enable_progress_bar=false",
        "callbacks.model_summary=null",
    ]
    train(compose_cfg("train", overrides, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 <= saved["test/top1"] <= 1 and 0 <= saved["test/bleu_mt"] <= 100
    assert "test/wer" not in saved  # no speech encoder, no speech tasks

    trained = read_summary(tmp_path / "run")
    in_optimizer, with_grad = trained["optimizer"], trained["gradients"]
    decoder = [part for part in in_optimizer if part.startswith("decoder.")]
    assert decoder == ([] if strategy == "adapter" else ["decoder.layers.0-2 (LoRA)"]), decoder
    for part in ("image_encoder", "cross_attention"):  # encoder + projector, the released layers
        parts = [p for p in trained["all"] if p.startswith(part)]
        assert parts and all(in_optimizer.get(p) == trained["all"][p] for p in parts), part
        assert any(with_grad.get(p) for p in parts), part  # images reached them

    system = load_system(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(system.model.image_encoder, MllamaImageEncoder)
    assert [int(j) for j in system.model.cross_attention] == [1, 3]  # the release's slots
    assert system.hparams.vision["mllama"]["cross_attention_layers"] == [1, 4]

    # exported in the released layout (LoRA merged): transformers computes the same logits
    from herd.data.mllama_images import mllama_pixel_batch
    from herd.export import export

    out = export(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "export")
    back = transformers.MllamaForConditionalGeneration.from_pretrained(out).eval()
    image = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    tokens = torch.randint(8, 4000, (1, 9))
    tokens[0, 2] = RELEASE_IMAGE_ID
    cross = torch.zeros(1, 9, 1, 4, dtype=torch.long)
    cross[0, 2:, 0, 0] = 1
    pixels = mllama_pixel_batch([[image]], tile=28, max_tiles=4)
    pixels.pop("num_tiles")
    expected = hf_logits(back, input_ids=tokens, cross_attention_mask=cross, **pixels)
    with torch.no_grad():
        got = system.model.eval()(tokens, images=(image.float() / 127.5 - 1)[None, None])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_release_with_a_mismatched_tokenizer_or_a_second_encoder_is_refused(tmp_path):
    import shutil
    from importlib.resources import files

    from herd.errors import ConfigError
    from herd.systems.fusion import FusionSystem

    release = tiny_mllama_with_tokenizer(tmp_path / "release")
    with pytest.raises(ConfigError, match="its own image encoder; drop model.vision.checkpoint"):
        FusionSystem(
            {"pretrained": str(release)}, vision={"checkpoint": "vision.ckpt"}, speech=None
        )
    bundled = files("herd.assets") / "tokenizers" / "python_docs_bpe_4k.json"
    shutil.copyfile(bundled, release / "tokenizer.json")  # <|image|> at 6, not 4097
    with pytest.raises(ConfigError, match=r"puts <\|image\|> at 6, but the Llama 3.2 Vision"):
        FusionSystem({"pretrained": str(release)}, vision=None, speech=None)
