"""A fusion model from a released-style Llama, exported (everything, or the adapters alone)
and reopened with `model.init_from=DIR`: the same outputs, and a decoder transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from herd.data.chat import Example, collate, encode_example
from herd.errors import ConfigError
from herd.export import export
from herd.systems.fusion import FusionSystem
from herd.systems.fusion_export import save_fusion_export

from .test_chat_manifest import llama3_style_checkpoint

VISION = {
    "encoder": {
        "patch_size": 8,
        "feature_layers": [0],
        "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    }
}
SPEECH = {
    "encoder": {"dim": 32, "n_layers": 1, "n_heads": 2, "ffn_dim": 64, "dropout": 0.0},
    "adapter": {"dim": 32, "n_heads": 2, "ffn_dim": 64},
}
CONTEXT = {"max_seq_len": 512, "rope_scaling": None}


def fusion_from(llama_dir, strategy: str) -> FusionSystem:
    torch.manual_seed(0)
    system = FusionSystem(
        language={"pretrained": str(llama_dir), "llama": CONTEXT},
        vision=VISION,
        speech=SPEECH,
        finetune={"strategy": strategy, "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}},
        cross_attention_every=1,
    )
    with torch.no_grad():  # trained-looking: open gates, moved adapter and LoRA weights
        for name, p in system.model.named_parameters():
            if p.requires_grad and not name.startswith(("image_encoder", "speech_encoder")):
                p.add_(0.05 * torch.randn_like(p))
    return system.eval()


def a_batch(system: FusionSystem) -> dict:
    spec = system.input_spec()
    tokenizer, size, channels = spec.tokenizer, spec.image_size, spec.channels
    example = Example(
        "figure",
        "figure 1: <|image|> remark: <|speech|> which digit?",
        "seven",
        images=(torch.rand(channels, size, size) * 2 - 1,),
        audio=(0.1 * torch.randn(8000),),
    )
    sample = {**encode_example(example, tokenizer, spec.speech_tokens), "task": "figure"}
    return collate(
        [
            {
                **sample,
                "images": list(example.images),
                "audio": list(example.audio),
                "answer": "seven",
            }
        ],
        tokenizer.pad_id,
    )


def logits(system: FusionSystem, batch: dict) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("images", "image_mask", "audio", "audio_lengths")}
    with torch.no_grad():
        return system.model(batch["input_ids"], **inputs)


@pytest.mark.parametrize(
    "strategy, parts", [("adapter", "adapters"), ("lora", "all"), ("full", "all")]
)
def test_an_export_reopens_to_the_same_outputs(tmp_path, strategy, parts):
    llama = llama3_style_checkpoint(tmp_path / "llama")
    system = fusion_from(llama, strategy)
    batch = a_batch(system)
    out = save_fusion_export(system, tmp_path / "export", parts)
    reopened = FusionSystem(language={"llama": CONTEXT}, init_from=str(out)).eval()
    torch.testing.assert_close(logits(reopened, batch), logits(system, batch), atol=1e-5, rtol=1e-5)
    assert reopened.hparams.init_from is None  # its checkpoints hold the weights themselves
    written = sorted(p.name for p in out.iterdir())
    if parts == "adapters":  # small: the decoder stays where the run started from
        assert written == ["fusion.json", "fusion.safetensors"]
        assert json.loads((out / "fusion.json").read_text())["decoder"] == str(llama.resolve())
    else:  # the decoder (LoRA merged) is a Llama that transformers loads as it is
        hf = transformers.LlamaForCausalLM.from_pretrained(out / "decoder").eval()
        tokens = batch["input_ids"][:, :8]
        with torch.no_grad():
            torch.testing.assert_close(
                hf(tokens).logits, system.model.decoder(tokens), atol=1e-4, rtol=1e-4
            )
        assert (out / "decoder" / "tokenizer.json").is_file()


def test_what_an_export_cannot_hold_is_named(tmp_path):
    llama = llama3_style_checkpoint(tmp_path / "llama")
    system = fusion_from(llama, "full")
    with pytest.raises(ConfigError, match="trained its decoder \\(finetune=full\\).*--parts all"):
        save_fusion_export(system, tmp_path / "a", "adapters")
    with pytest.raises(ConfigError, match="is not a herd fusion export: it has no fusion.json"):
        FusionSystem(language={"llama": CONTEXT}, init_from=str(tmp_path))
    ckpt = tmp_path / "fusion.ckpt"
    torch.save({"state_dict": {}}, ckpt)  # not a herd checkpoint at all
    with pytest.raises(ConfigError, match="fusion.ckpt was not written by a herd system"):
        export(ckpt, tmp_path / "b")
