"""A trained fusion model as files other tools can read, and back.

    OUT/fusion.json          the architecture: the decoder's place, the encoders' and the
                             speech adapter's configs, cross_attention_every, video
    OUT/fusion.safetensors   every weight but the decoder's: image encoder (+ projection),
                             cross-attention layers with their gates, speech encoder + adapter
    OUT/decoder/             (parts=all) the decoder as a Hugging Face Llama directory, with
                             its tokenizer: transformers loads it as it is

`parts=adapters` leaves the decoder out and records the Llama directory the run started
from (`pretrained=`): small, and only right when the decoder did not train
(`finetune=adapter`). A LoRA-trained decoder is exported merged (parts=all).

`model.init_from=OUT` reopens an export as a FusionSystem (to evaluate, or to train on).

A fusion model built on a Llama 3.2 Vision release (experiment=vision_llama32_11b) is
written back in the released layout instead (config.json, safetensors, tokenizer), which
transformers' MllamaForConditionalGeneration and `pretrained=OUT` load.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from herd.data.tokenizer import HFTokenizer, TiktokenTokenizer
from herd.errors import ConfigError
from herd.models.lora import merge_lora
from herd.models.mllama import mllama_from_fusion_model
from herd.models.pretrained import save_hf_checkpoint
from herd.models.pretrained_mllama import save_hf_mllama

CONFIG, WEIGHTS, DECODER = "fusion.json", "fusion.safetensors", "decoder"
PARTS = ("all", "adapters")


def save_fusion_export(system, out: Path, parts: str = "all", dtype=torch.float32) -> Path:
    """Write `system` (a FusionSystem) to the new directory `out` (see the module doc)."""
    from safetensors.torch import save_file

    if parts not in PARTS:
        raise ConfigError(f"parts={parts!r} is not one of {list(PARTS)}.")
    hp = system.hparams
    strategy = (hp.finetune or {}).get("strategy", "full")
    if parts == "adapters":
        if strategy != "adapter":
            raise ConfigError(
                f"This fusion model trained its decoder (finetune={strategy}); exporting the "
                "adapters alone would lose that. Export --parts all."
            )
        source = Path(str(hp.language["tokenizer"]))
        if not source.is_dir():
            raise ConfigError(
                "This fusion model's decoder did not come from a Llama checkpoint directory "
                "(pretrained=), so the adapters alone cannot name it. Export --parts all."
            )
    released = "mllama" in (hp.vision or {})
    if released and parts != "all":
        raise ConfigError(
            "This fusion model is a Llama 3.2 Vision release, exported whole in the released "
            "layout; export --parts all."
        )
    model = copy.deepcopy(system.model).to(dtype)
    if strategy == "lora":
        merge_lora(model.decoder)  # plain projections: what transformers and herd load
    out.mkdir(parents=True, exist_ok=True)
    if released:  # the layout transformers' MllamaForConditionalGeneration loads
        save_hf_mllama(mllama_from_fusion_model(model), out)
        _copy_tokenizer(system.tokenizer, out, hp.language["tokenizer"])
        return out
    weights = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in model.state_dict().items()
        if not name.startswith("decoder.")
    }
    save_file(weights, out / WEIGHTS, metadata={"format": "pt"})
    if parts == "all":
        save_hf_checkpoint(model.decoder, out / DECODER, tokenizer=system.tokenizer)
        _copy_tokenizer(system.tokenizer, out / DECODER, hp.language["tokenizer"])
        decoder = DECODER
    else:
        decoder = str(source.resolve())
    config = {
        "decoder": decoder,
        "vision": hp.vision,
        "speech": hp.speech,
        "cross_attention_every": hp.cross_attention_every,
        "video": hp.get("video"),
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _copy_tokenizer(tokenizer, out: Path, spec: str) -> None:
    if isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
    elif isinstance(tokenizer, TiktokenTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    else:
        raise ConfigError(f"The decoder's tokenizer ({spec!r}) has no file to export.")


def read_fusion_export(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture with the decoder's directory resolved, non-decoder weights) of an
    export directory; one clear error for what is missing."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ConfigError(f"{path} is not a herd fusion export: it has no {name}.")
    config = json.loads((path / CONFIG).read_text())
    decoder = path / config["decoder"]  # relative: inside the export; absolute: as recorded
    if not decoder.is_dir():
        raise ConfigError(f"The decoder {decoder} named by {path / CONFIG} does not exist.")
    config["decoder"] = str(decoder)
    return config, load_file(path / WEIGHTS)


__all__ = ["PARTS", "read_fusion_export", "save_fusion_export"]
