"""Real Llama 3.x checkpoints in and out.

In:  a Hugging Face directory (config.json + model.safetensors, or sharded
     model-0000x-of-0000y.safetensors with model.safetensors.index.json), or a Meta
     directory (params.json + consolidated.*.pth, read with weights_only=True).
Out: a Hugging Face directory that `transformers.LlamaForCausalLM.from_pretrained` loads.

The model is built on the meta device and the loaded tensors are assigned into it, so
loading never holds two full copies of the weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from herd.errors import ConfigError
from herd.models.llama import ORIGINAL_CONTEXT, Llama, LlamaConfig, RopeScaling

HF_INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- configs


def _rope_from_hf(hf: dict, where: Path) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either transformers' v4 (`rope_theta` + `rope_scaling`) or
    v5 (`rope_parameters`) layout."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or params
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"{where}: rope_type {rope_type!r} is not supported; herd implements 'llama3'."
        )
    try:
        return theta, RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_seq_len=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: llama3 rope scaling lacks the key {exc.args[0]!r}.") from exc


def config_from_hf(path: Path) -> LlamaConfig:
    where = path / "config.json"
    hf = json.loads(where.read_text())
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"{where}: model_type {hf.get('model_type')!r} is not a Llama.")
    return llama_config_from_hf_dict(hf, where, flavor=f"hf:{path.name}")


def llama_config_from_hf_dict(
    hf: dict, where: Path, flavor: str, n_layers: int | None = None, extra_input_tokens: int = 0
) -> LlamaConfig:
    """A transformers Llama(-like) config dict as a LlamaConfig; `n_layers` overrides
    num_hidden_layers (Mllama's counts its cross-attention layers too)."""
    theta, scaling = _rope_from_hf(hf, where)
    try:
        cfg = LlamaConfig(
            dim=hf["hidden_size"],
            n_layers=n_layers if n_layers is not None else hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            ffn_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=theta,
            max_seq_len=hf.get("max_position_embeddings", ORIGINAL_CONTEXT),
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            extra_input_tokens=extra_input_tokens,
            flavor=flavor,
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: missing the key {exc.args[0]!r}.") from exc
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise ConfigError(
            f"{where}: head_dim {head_dim} differs from hidden_size / num_attention_heads."
        )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(
            f"{where}: biased attention/MLP projections are not Llama 3 and not supported."
        )
    return cfg


def config_to_hf(
    cfg: LlamaConfig,
    dtype: str = "float32",
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict:
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        rope.update(
            rope_type="llama3",
            factor=s.factor,
            low_freq_factor=s.low_freq_factor,
            high_freq_factor=s.high_freq_factor,
            original_max_position_embeddings=s.original_max_seq_len,
        )
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        # both layouts, so transformers v4 and v5 read the same RoPE
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "torch_dtype": dtype,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def _meta_ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_meta(path: Path, vocab_size: int) -> LlamaConfig:
    where = path / "params.json"
    p = json.loads(where.read_text())
    try:
        dim = p["dim"]
        ffn = _meta_ffn_dim(dim, p.get("multiple_of", 256), p.get("ffn_dim_multiplier"))
        scaled = bool(p.get("use_scaled_rope", False))
        return LlamaConfig(
            dim=dim,
            n_layers=p["n_layers"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            vocab_size=p.get("vocab_size", -1) if p.get("vocab_size", -1) > 0 else vocab_size,
            ffn_dim=ffn,
            norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=float(p.get("rope_theta", 500_000.0)),
            max_seq_len=131_072 if scaled else ORIGINAL_CONTEXT,
            rope_scaling=RopeScaling(factor=float(p.get("rope_scaling_factor", 8.0)))
            if scaled
            else None,
            flavor=f"meta:{path.name}",
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: missing the key {exc.args[0]!r}.") from exc


# ----------------------------------------------------------------------------- weights


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / HF_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        weight_map, shards = None, ["model.safetensors"]
    else:
        raise ConfigError(f"{path} holds neither model.safetensors nor {HF_INDEX}.")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        file = path / shard
        if not file.is_file():
            raise ConfigError(f"Shard {file} listed in {HF_INDEX} is missing.")
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"Shard {file} is truncated or corrupt: {exc}") from exc
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ConfigError(
                f"{HF_INDEX} lists {missing[0]} (and {len(missing) - 1} more) that no shard holds."
            )
    return {k.removeprefix("model."): v for k, v in state.items()}


# Meta name -> herd name; {i} is the layer index.
META_NAMES = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.mlp.down_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.mlp.up_proj.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
}
# Model-parallel shards of Meta Llama 3 checkpoints split these along the given dim (others
# are replicated); Llama 3 splits the embedding by vocabulary (Llama 2 split it by width).
META_SHARD_DIM = {
    "tok_embeddings": 0,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "wo": 1,
    "w1": 0,
    "w3": 0,
    "w2": 1,
}


def _meta_to_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; herd and HF rotate halves.
    Reorder each head's output rows from interleaved to half-split."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _read_meta_weights(path: Path) -> dict[str, torch.Tensor]:
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise ConfigError(f"{path} holds params.json but no consolidated.*.pth weights.")
    parts = []
    for shard in shards:
        try:
            parts.append(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
        except Exception as exc:  # pickle and zip errors have many types
            raise ConfigError(
                f"Shard {shard} could not be read as weights ({type(exc).__name__}): {exc}"
            ) from exc
    if len(parts) == 1:
        return parts[0]
    merged = {}
    for name in parts[0]:
        kind = name.split(".")[-2]
        dim = META_SHARD_DIM.get(kind)
        merged[name] = (
            parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim=dim)
        )
    return merged


def _rename_meta(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    patterns = [
        (re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v)
        for k, v in META_NAMES.items()
    ]
    out = {}
    for name, tensor in state.items():
        if (
            name == "rope.freqs"
        ):  # some releases store the (unscaled) frequencies; herd computes them
            continue
        for pattern, target in patterns:
            m = pattern.match(name)
            if m:
                new = target.replace("{i}", m.group(1)) if m.groups() else target
                if new.endswith("q_proj.weight"):
                    tensor = _meta_to_rotate_half(tensor, cfg.n_heads)
                elif new.endswith("k_proj.weight"):
                    tensor = _meta_to_rotate_half(tensor, cfg.n_kv_heads)
                out[new] = tensor
                break
        else:
            raise ConfigError(f"Meta checkpoint holds the unknown tensor {name!r}.")
    return out


# ----------------------------------------------------------------------------- load / save


def assign_weights(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: Path,
    dtype: torch.dtype | None,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Load `state` into `model` (built on the meta device) without copying, after checking
    that names and shapes match; names in `optional` may be absent."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        culprit = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ConfigError(
            f"{source}: weights do not match the config ({culprit}; "
            f"{len(missing)} missing, {len(unexpected)} unexpected)."
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the config implies "
                f"{tuple(expected[name].shape)} (check vocab_size, heads and dims)."
            )
        if dtype is not None:
            state[name] = tensor.to(dtype)
    model.load_state_dict(state, strict=False, assign=True)


def _assign(
    cfg: LlamaConfig, state: dict[str, torch.Tensor], source: Path, dtype: torch.dtype | None
) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg)
    tied = frozenset({"lm_head.weight"}) if cfg.tie_embeddings else frozenset()
    for name in tied:
        state.pop(name, None)
    assign_weights(model, state, source, dtype, optional=tied)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # the fp32 RoPE frequencies, still on meta: compute them for real
    model.reset_rope()
    return model


def load_pretrained_llama(
    path: str | Path, dtype: torch.dtype | None = None, vocab_size: int | None = None
) -> Llama:
    """A Llama 3.x checkpoint directory (Hugging Face or Meta layout) as a herd `Llama`.

    `dtype` casts the weights (default: as stored). Meta checkpoints whose params.json has no
    vocab_size need `vocab_size` (Llama 3: 128256)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"Pretrained checkpoint directory {path} does not exist.")
    if (path / "config.json").is_file():
        cfg = config_from_hf(path)
        state = read_hf_weights(path)
    elif (path / "params.json").is_file():
        state = _read_meta_weights(path)
        emb = state.get("tok_embeddings.weight")
        cfg = config_from_meta(
            path, vocab_size or (emb.shape[0] * 1 if emb is not None else 128_256)
        )
        state = _rename_meta(state, cfg)
    else:
        raise ConfigError(
            f"{path} holds neither config.json (Hugging Face) nor params.json (Meta)."
        )
    return _assign(cfg, state, path, dtype)


def save_hf_checkpoint(
    model: Llama, path: str | Path, max_shard_bytes: int | None = None, tokenizer=None
) -> Path:
    """Write `model` as a Hugging Face Llama directory (config.json + safetensors); with a
    herd tokenizer, its bos/eos ids go into the config so generation stops where herd's does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id} if tokenizer else {}
    hf_config = config_to_hf(model.config, dtype=dtype, **ids)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        hf_name = name if name == "lm_head.weight" else f"model.{name}"
        state[hf_name] = tensor
    return write_safetensors(state, path, max_shard_bytes)


def write_safetensors(
    state: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None = None
) -> Path:
    """`state` as model.safetensors, or as shards of at most `max_shard_bytes` with the index
    transformers reads."""
    from safetensors.torch import save_file

    state = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    if max_shard_bytes is None:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return path
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (path / HF_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return path
