"""Llama 3.2 Vision checkpoints (Hugging Face `mllama` layout) in and out.

In:  config.json (model_type "mllama", text_config + vision_config) and safetensors, one
     file or shards with their index; names as released (`language_model.model.*`,
     `language_model.lm_head.*`, `vision_model.*`, `multi_modal_projector.*`) or as
     transformers holds them in memory (`model.language_model.*`, `lm_head.*`, ...).
Out: the released layout, which `transformers.MllamaForConditionalGeneration` loads.

Herd's names differ only in the decoder: the release's layer r is herd's decoder layer j
(self-attention) or cross-attention layer j (`cross_attention.{j}`, run before decoder
layer j), and a cross-attention layer's gates are TanhGate modules (`attn_gate.gate`,
a scalar; `cross_attn_attn_gate`, shape [1], in the release).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from herd.errors import ConfigError
from herd.models.mllama import MllamaConfig, MllamaModel
from herd.models.mllama_vision import MllamaVisionConfig
from herd.models.pretrained import (
    assign_weights,
    config_to_hf,
    llama_config_from_hf_dict,
    read_hf_weights,
    write_safetensors,
)

# transformers' in-memory prefixes -> the release's
_PREFIXES = {
    "language_model.model.": "language_model.model.",
    "language_model.lm_head.": "language_model.lm_head.",
    "language_model.": "language_model.model.",  # model.language_model.* after "model." is cut
    "lm_head.": "language_model.lm_head.",
    "vision_model.": "vision_model.",
    "multi_modal_projector.": "multi_modal_projector.",
}
# the release's cross-attention layer names -> herd's GatedCrossAttention names
_CROSS_NAMES = {
    "cross_attn.q_proj.weight": "q_proj.weight",
    "cross_attn.k_proj.weight": "k_proj.weight",
    "cross_attn.v_proj.weight": "v_proj.weight",
    "cross_attn.o_proj.weight": "o_proj.weight",
    "cross_attn.q_norm.weight": "q_norm.weight",
    "cross_attn.k_norm.weight": "k_norm.weight",
    "cross_attn_attn_gate": "attn_gate.gate",
    "cross_attn_mlp_gate": "mlp_gate.gate",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate")
_VISION_FIELDS = tuple(MllamaVisionConfig.__dataclass_fields__)


def is_mllama_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face Llama 3.2 Vision directory (model_type mllama)."""
    where = Path(path) / "config.json"
    try:
        return json.loads(where.read_text()).get("model_type") == "mllama"
    except (OSError, ValueError):
        return False  # not a directory with a readable config: the other loaders say why


def mllama_config_from_hf(path: Path) -> MllamaConfig:
    where = path / "config.json"
    hf = json.loads(where.read_text())
    if hf.get("model_type") != "mllama":
        raise ConfigError(
            f"{where}: model_type {hf.get('model_type')!r} is not 'mllama' (Llama 3.2 Vision); "
            "a text-only Llama loads with load_pretrained_llama."
        )
    try:
        text, vision = hf["text_config"], hf["vision_config"]
        cross = list(text["cross_attention_layers"])
        n_self = text["num_hidden_layers"] - len(cross)
    except KeyError as exc:
        raise ConfigError(f"{where}: missing the key {exc.args[0]!r}.") from exc
    text_cfg = llama_config_from_hf_dict(
        text, where, flavor=f"hf:{path.name}", n_layers=n_self, extra_input_tokens=8
    )
    vision_cfg = MllamaVisionConfig(**{k: v for k, v in vision.items() if k in _VISION_FIELDS})
    out = vision.get("vision_output_dim", vision_cfg.output_dim)
    if out != vision_cfg.output_dim:
        raise ConfigError(
            f"{where}: vision_output_dim {out} is not hidden_size x (1 + "
            f"len(intermediate_layers_indices)) = {vision_cfg.output_dim}."
        )
    return MllamaConfig(text=text_cfg, cross_attention_layers=tuple(cross), vision=vision_cfg)


def _released_name(name: str) -> str:
    for prefix, released in _PREFIXES.items():
        if name.startswith(prefix):
            return released + name.removeprefix(prefix)
    return name  # unknown: reported as unexpected


def _layer_slots(cfg: MllamaConfig) -> tuple[dict[int, int], dict[int, int]]:
    """The release's layer number -> herd's index: {r: j} for the cross-attention layers
    (`cross_attention.{j}`) and for the self-attention ones (`decoder.layers.{j}`)."""
    cross = dict(zip(cfg.cross_attention_layers, cfg.cross_attention_slots(), strict=True))
    self_ids = [r for r in range(cfg.num_decoder_layers) if r not in cross]
    return cross, {r: j for j, r in enumerate(self_ids)}


def _to_herd(state: dict[str, torch.Tensor], cfg: MllamaConfig) -> dict[str, torch.Tensor]:
    cross, self_slot = _layer_slots(cfg)
    out = {}
    for name, tensor in state.items():
        name = _released_name(name)
        if name.startswith("language_model.lm_head."):
            out["decoder." + name.removeprefix("language_model.")] = tensor
            continue
        if not name.startswith("language_model.model.layers."):
            out[name.replace("language_model.model.", "decoder.", 1)] = tensor
            continue
        layer, rest = name.removeprefix("language_model.model.layers.").split(".", 1)
        r = int(layer)
        if r in cross:
            if rest not in _CROSS_NAMES:
                out[name] = tensor  # reported as unexpected
                continue
            out[f"cross_attention.{cross[r]}.{_CROSS_NAMES[rest]}"] = (
                tensor.reshape(()) if rest in _GATES else tensor
            )
        elif r in self_slot:
            out[f"decoder.layers.{self_slot[r]}.{rest}"] = tensor
        else:
            out[name] = tensor
    return out


def load_pretrained_mllama(path: str | Path, dtype: torch.dtype | None = None) -> MllamaModel:
    """A Llama 3.2 Vision checkpoint directory (Hugging Face layout) as herd's MllamaModel,
    whose call takes what transformers' Mllama processor returns and gives logits."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} holds no config.json (a Hugging Face Llama 3.2 Vision dir).")
    cfg = mllama_config_from_hf(path)
    state = _to_herd(read_hf_weights(path), cfg)
    with torch.device("meta"):
        model = MllamaModel(cfg)
    assign_weights(model, state, path, dtype)
    model.decoder.reset_rope()  # the fp32 RoPE frequencies, still on meta
    return model


def save_hf_mllama(model: MllamaModel, path: str | Path, max_shard_bytes: int | None = None):
    """`model` as a Hugging Face Llama 3.2 Vision directory, in the released layout."""
    cfg = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = str(model.decoder.embed_tokens.weight.dtype).removeprefix("torch.")
    text = config_to_hf(cfg.text, dtype=dtype)
    for key in ("architectures", "torch_dtype", "attention_bias", "mlp_bias", "head_dim"):
        text.pop(key)
    for key in ("bos_token_id", "eos_token_id"):  # unknown here: transformers' defaults
        text.pop(key)
    text.update(
        model_type="mllama_text_model",
        num_hidden_layers=cfg.num_decoder_layers,
        cross_attention_layers=list(cfg.cross_attention_layers),
        pad_token_id=None,
    )
    vision = dict(
        cfg.vision.to_dict(),
        model_type="mllama_vision_model",
        vision_output_dim=cfg.vision.output_dim,
    )
    hf = {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": cfg.image_token_id,
        "text_config": text,
        "vision_config": vision,
        "torch_dtype": dtype,
    }
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")

    cross, self_slot = _layer_slots(cfg)
    cross_layer = {j: r for r, j in cross.items()}
    self_layer = {j: r for r, j in self_slot.items()}
    herd_to_cross = {v: k for k, v in _CROSS_NAMES.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("cross_attention."):
            _, j, rest = name.split(".", 2)
            hf_rest = herd_to_cross[rest]
            name = f"language_model.model.layers.{cross_layer[int(j)]}.{hf_rest}"
            tensor = tensor.reshape(1) if hf_rest in _GATES else tensor
        elif name.startswith("decoder.layers."):
            _, _, j, rest = name.split(".", 3)
            name = f"language_model.model.layers.{self_layer[int(j)]}.{rest}"
        elif name == "decoder.lm_head.weight":
            name = "language_model.lm_head.weight"
        elif name.startswith("decoder."):
            name = "language_model.model." + name.removeprefix("decoder.")
        state[name] = tensor
    return write_safetensors(state, path, max_shard_bytes)


__all__ = [
    "is_mllama_checkpoint",
    "load_pretrained_mllama",
    "mllama_config_from_hf",
    "save_hf_mllama",
]
