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
