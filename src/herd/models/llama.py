"""Llama 3.1 decoder, read top to bottom.

    tokens [B, T] -> embedding -> n_layers x (RMSNorm -> GQA attention -> residual,
                                               RMSNorm -> SwiGLU MLP   -> residual)
                  -> RMSNorm -> output projection -> logits [B, T, vocab]

Plain single-device PyTorch: no Lightning, no Hydra, no parallelism. Weight names and the
rotary layout (rotate-half, as in Hugging Face checkpoints) are chosen so that HF Llama
checkpoints map onto this module one tensor to one tensor.

Shape legend: B batch, T query length, S key length (cache + new), D model width,
H query heads, K key/value heads, Hd head dim (D // H), F FFN width, V vocabulary.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError

# ----------------------------------------------------------------------------- config


ORIGINAL_CONTEXT = 8192  # Llama 3 pre-training context; RoPE is scaled beyond it.


ATTENTION_BACKENDS = ("auto", "flex", "sdpa")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 ("llama3") frequency scaling used to stretch RoPE past the original context."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = ORIGINAL_CONTEXT
    rope_type: str = "llama3"

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; use 'llama3'."
            )
        if self.factor < 1 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling needs factor >= 1 and high_freq_factor > low_freq_factor, got {self}."
            )


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama 3.x decoder. Validated on construction."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    max_seq_len: int = ORIGINAL_CONTEXT
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    # embedding rows beyond the vocabulary that are read but never predicted: Llama 3.2
    # Vision's text model embeds 8 more tokens than its output layer scores (<|image|> is
    # the first, id vocab_size)
    extra_input_tokens: int = 0
    # document-masked attention kernel: "flex" (flex_attention + block mask), "sdpa" (boolean
    # mask), or "auto": flex on CUDA, SDPA elsewhere (flex has no CPU backward)
    attention_backend: str = "auto"
    flavor: str = "custom"

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # from YAML / JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        where = f"flavor {self.flavor!r}"
        for name in (
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "ffn_dim",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive, got {getattr(self, name)}.")
        if self.dim % self.n_heads:
            raise ConfigError(
                f"{where}: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                "pick n_heads that divides dim."
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{where}: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}; "
                "grouped-query attention needs whole groups."
            )
        if self.extra_input_tokens < 0 or (self.extra_input_tokens and self.tie_embeddings):
            raise ConfigError(
                f"{where}: extra_input_tokens {self.extra_input_tokens} must be >= 0, and 0 "
                "with tie_embeddings (a tied table has one row per predicted token)."
            )
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"{where}: attention_backend {self.attention_backend!r} is not one of "
                f"{list(ATTENTION_BACKENDS)}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head dim {self.head_dim} must be even for RoPE.")
        if self.rope_scaling is None and self.max_seq_len > self.original_max_seq_len:
            raise ConfigError(
                f"{where}: max_seq_len {self.max_seq_len} is longer than the {self.original_max_seq_len} "
                "tokens RoPE was trained for and no rope_scaling is set; use a shorter context "
                "or one with llama3 RoPE scaling (context=32k or longer)."
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def original_max_seq_len(self) -> int:
        return self.rope_scaling.original_max_seq_len if self.rope_scaling else ORIGINAL_CONTEXT

    @classmethod
    def from_flavor(cls, flavor: str, **overrides) -> LlamaConfig:
        """A named flavor with optional field overrides, e.g. from_flavor("tiny", max_seq_len=512).
        One rule for every field: None keeps the flavor's value (YAML's null). RoPE scaling off
        on a flavor that has it is `RopeScaling(factor=1.0)`, which leaves every frequency."""
        if flavor not in FLAVORS:
            raise ConfigError(f"Unknown Llama flavor {flavor!r}; choose one of {sorted(FLAVORS)}.")
        unknown = set(overrides) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(
                f"Unknown LlamaConfig field(s) {sorted(unknown)} for flavor {flavor!r}."
            )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(FLAVORS[flavor], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim
        total = self.n_layers * per_layer + self.dim + (0 if self.tie_embeddings else emb)
        return total if exclude_embeddings else total + emb + self.extra_input_tokens * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul weights, plus attention
        scores and values, 12 x layers x dim x seq_len (the PaLM paper's accounting)."""
        matmul = self.num_params(exclude_embeddings=True) - (self.n_layers * 2 + 1) * self.dim
        if self.tie_embeddings:  # the tied output projection is still a matmul
            matmul += self.vocab_size * self.dim
        return 6 * matmul + 12 * self.n_layers * self.dim * seq_len

    def batch_flops(self, tokens_shape: tuple[int, int], doc_ids: torch.Tensor | None = None):
        """Training FLOPs of one batch [B, T]. With packed documents (doc_ids [B, T]) each
        token attends within its own document, so a document of n tokens counts n x
        flops_per_token(n), not the whole row's length: flex_attention skips the rest, and
        counting it would report more FLOP/s than the chip has."""
        if doc_ids is None:
            return tokens_shape[0] * tokens_shape[1] * self.flops_per_token(tokens_shape[1])
        return float(sum(n * self.flops_per_token(n) for n in document_lengths(doc_ids).tolist()))


LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)

# Release flavors follow the published configs; the small ones are for CPU work and tests.
FLAVORS: dict[str, LlamaConfig] = {
    "llama3_1_8b": LlamaConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128_256,
        ffn_dim=14_336,
        max_seq_len=131_072,
        rope_scaling=LLAMA31_SCALING,
        flavor="llama3_1_8b",
    ),
    "llama3_1_70b": LlamaConfig(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128_256,
        ffn_dim=28_672,
        max_seq_len=131_072,
        rope_scaling=LLAMA31_SCALING,
        flavor="llama3_1_70b",
    ),
    "llama3_2_1b": LlamaConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128_256,
        ffn_dim=8192,
        max_seq_len=131_072,
        rope_scaling=RopeScaling(factor=32.0),
        tie_embeddings=True,
        flavor="llama3_2_1b",
    ),
    "llama3_2_3b": LlamaConfig(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=128_256,
        ffn_dim=8192,
        max_seq_len=131_072,
        rope_scaling=RopeScaling(factor=32.0),
        tie_embeddings=True,
        flavor="llama3_2_3b",
    ),
    # 6.6M parameters with a 4K vocabulary: trains on 2 CPU cores in minutes.
    "small": LlamaConfig(
        dim=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=4096,
        ffn_dim=768,
        max_seq_len=2048,
        flavor="small",
    ),
    # ~0.2M parameters (with a 512-token vocabulary): unit tests and smoke runs.
    "tiny": LlamaConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        ffn_dim=192,
        max_seq_len=512,
        flavor="tiny",
    ),
}


# ----------------------------------------------------------------------------- RoPE


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None
) -> torch.Tensor:
    """[Hd/2] fp32 inverse frequencies, with Llama 3.1 scaling applied when given.

    Scaling by wavelength (2*pi/freq) against the original context L:
      wavelength > L / low_freq_factor  -> freq / factor      (long waves: interpolate)
      wavelength < L / high_freq_factor -> freq               (short waves: keep)
      otherwise smooth = (L / wavelength - low) / (high - low),
                freq' = (1 - smooth) * freq / factor + smooth * freq
    The operation order matches Hugging Face transformers so results agree bit for bit.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [Hd/2]
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_seq_len
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, Hd] in fp32 (rotate-half layout: frequencies repeated)."""
    freqs = positions.float()[..., None] * inv_freq  # [B, T, Hd/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, Hd]
    return angles.cos(), angles.sin()


class RotaryFrequencies(nn.Module):
    """positions [B, T] -> RoPE cos, sin [B, T, Hd], from fp32 inverse frequencies.

    The frequencies are a plain attribute, not a buffer: module-wide casts (precision=bf16_true,
    FSDP's MixedPrecision buffer_dtype) would round them to bf16, which puts position 8000 off
    by radians. Device moves still apply."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None):
        super().__init__()
        self.reset(head_dim, theta, scaling)

    def reset(self, head_dim: int, theta: float, scaling: RopeScaling | None, device=None) -> None:
        self.settings = (head_dim, theta, scaling)
        self.inv_freq = rope_inverse_frequencies(head_dim, theta, scaling).to(device)  # [Hd/2]

    def _apply(self, fn, recurse=True):
        # Follow the device of whatever fn produces, never its dtype.
        device = fn(torch.empty(0, device=self.inv_freq.device)).device
        self.reset(*self.settings, device=device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:  # moved by a wrapper that bypassed _apply
            self.inv_freq = self.inv_freq.to(positions.device)
        return rope_cos_sin(positions, self.inv_freq)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, Hd] rotated by position; cos/sin [B, T, Hd]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # [B, 1, T, Hd]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------- masks


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> positions [B, T] that restart at 0 where each packed document starts."""
    B, T = doc_ids.shape
    index = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def document_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> [N] lengths of the N runs of one id in each row (a row's padding,
    id -1, is one run too: it is computed)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run = starts.flatten().cumsum(0) - 1  # [B*T] run index; a row's first token starts a run
    return torch.bincount(run)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [B, T] -> boolean mask [B, 1, T, T]: True where query t may attend key s
    (s <= t and both in the same document). Packed documents never see each other."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
    return (same_doc & causal)[:, None]


def document_block_mask(doc_ids: torch.Tensor):
    """doc_ids [B, T] -> flex_attention BlockMask with the same rule as document_causal_mask.
    Only blocks that hold an allowed pair are computed, so cost follows the documents' sizes."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[b, q_idx] == doc_ids[b, kv_idx]) & (kv_idx <= q_idx)

    B, T = doc_ids.shape
    return create_block_mask(
        same_document_causal, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda
    )


def _eager_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention  # reference path (CPU: forward only), used by the parity test


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # flex_attention is only fast (and only has a backward) when compiled, on CUDA.
    return torch.compile(flex_attention, dynamic=False)


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16, then return in the input dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys/values for incremental decoding: [B, K, max_len, Hd] each."""

    def __init__(
        self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device
    ):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, Hd] at positions start..start+T; return all keys/values so far."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; decoding reached {end}.")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # [B, K, S, Hd]


# torch's CPU attention kernel is slower in bf16 than in fp32 over short key rows, forward +
# backward, head dims 32-128 (benchmarks/cpu_bf16_attention.py: 1.25-2x slower at 128 keys,
# about even at 512, 1.3x faster from 1024).
CPU_BF16_ATTENTION_MAX_KEYS = 384


def attention(
    q: torch.Tensor,  # [B, H, T, Hd]
    k: torch.Tensor,  # [B, K, S, Hd]
    v: torch.Tensor,  # [B, K, S, Hd]
    mask: torch.Tensor | None = None,  # [B, 1, T, S] bool, True = may attend
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:  # [B, H, T, Hd]
    """Scaled dot-product attention, in fp32 where that is the faster kernel: bf16 on CPU
    (bf16 inputs, or bf16 autocast) over at most CPU_BF16_ATTENTION_MAX_KEYS keys, e.g. the
    fusion stage's short samples, where fp32 copies of q, k, v are small. Returns bf16 then."""
    cpu_bf16 = q.device.type == "cpu" and (
        torch.bfloat16 in (q.dtype, k.dtype, v.dtype)
        or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    )
    if cpu_bf16 and k.shape[-2] <= CPU_BF16_ATTENTION_MAX_KEYS:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(
                q.float(),
                k.float(),
                v.float(),
                attn_mask=mask,
                is_causal=is_causal,
                enable_gqa=enable_gqa,
            )
        return out.to(torch.bfloat16)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa
    )


# torch's CPU kernel computes every score a boolean mask hides, so a causal mask costs the
# whole T x T square. Cut into query blocks, each over the keys up to its own end, 4 blocks
# compute 10/16 of it, 8 blocks 36/64 (benchmarks/cpu_bf16_attention.py).
CPU_CAUSAL_QUERY_BLOCKS = 8
CPU_CAUSAL_MIN_BLOCK = 128


def causal_attention(
    q: torch.Tensor,  # [B, H, T, Hd]
    k: torch.Tensor,  # [B, K, T, Hd]
    v: torch.Tensor,  # [B, K, T, Hd]
    mask: torch.Tensor,  # [B or 1, 1, T, T] bool, causal: no query sees a later key
    enable_gqa: bool = False,
) -> torch.Tensor:  # [B, H, T, Hd]
    """attention() under a causal mask; on CPU in query blocks that skip the keys after them.
    Exact: the skipped keys are the ones the mask hides."""
    T = q.shape[-2]
    n_blocks = min(CPU_CAUSAL_QUERY_BLOCKS, T // CPU_CAUSAL_MIN_BLOCK)
    if q.device.type != "cpu" or n_blocks < 2 or k.shape[-2] != T:
        return attention(q, k, v, mask, enable_gqa=enable_gqa)
    ends = [T * (i + 1) // n_blocks for i in range(n_blocks)]
    starts = [0, *ends[:-1]]
    return torch.cat(
        [
            attention(
                q[:, :, s:e], k[:, :, :e], v[:, :, :e], mask[:, :, s:e, :e], enable_gqa=enable_gqa
            )  # [B, H, e - s, Hd]
            for s, e in zip(starts, ends, strict=True)
        ],
        dim=2,
    )


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (H % K == 0)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, D]
        cos: torch.Tensor,  # [B, T, Hd]
        sin: torch.Tensor,  # [B, T, Hd]
        mask,  # [B, 1, T, S] bool, a flex_attention BlockMask, or None for plain causal
        cache_start: int | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Hd]
        k = (
            self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        )  # [B, K, T, Hd]
        v = (
            self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        )  # [B, K, T, Hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None and cache_start is not None:
            k, v = self.cache.update(cache_start, k, v)  # [B, K, S, Hd]
        # Each key/value head serves H/K query heads; both kernels broadcast them (enable_gqa)
        # without materialising repeated keys and values.
        gqa = self.n_heads != self.n_kv_heads
        if mask is not None and not isinstance(mask, torch.Tensor):  # a BlockMask: flex path
            flex = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention()
            out = flex(q, k, v, block_mask=mask, enable_gqa=gqa)  # [B, H, T, Hd]
        elif mask is None:
            out = attention(q, k, v, is_causal=True, enable_gqa=gqa)  # [B, H, T, Hd]
        else:  # document-causal, or causal over a KV cache: no query sees a later key
            out = causal_attention(q, k, v, mask, enable_gqa=gqa)  # [B, H, T, Hd]
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # [B, T, H*Hd]
        return self.o_proj(out)  # [B, T, D]


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, mask, cache_start=None):  # x [B, T, D] -> [B, T, D]
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size + cfg.extra_input_tokens, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # cos/sin are recomputed on the fly from positions, so per-document positions cost
        # nothing extra.
        self.rope = RotaryFrequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Scale residual-branch outputs by depth so the residual stream starts near unit variance.
        for layer in self.layers:
            nn.init.normal_(
                layer.self_attn.o_proj.weight, std=std / math.sqrt(2 * self.config.n_layers)
            )
            nn.init.normal_(
                layer.mlp.down_proj.weight, std=std / math.sqrt(2 * self.config.n_layers)
            )
        self.reset_rope()

    def reset_rope(self) -> None:
        """Recompute the fp32 RoPE frequencies from self.config, on the weights' device.
        Call after changing the config's RoPE settings."""
        cfg = self.config
        self.rope.reset(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, self.embed_tokens.weight.device
        )

    # -- caching ---------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> None:
        """Allocate a KV cache in every attention layer for incremental decoding."""
        max_len = max_len or self.config.max_seq_len
        p = self.embed_tokens.weight
        for layer in self.layers:
            layer.self_attn.cache = KVCache(
                batch_size, max_len, self.config.n_kv_heads, self.config.head_dim, p.dtype, p.device
            )

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.cache = None

    # -- forward ---------------------------------------------------------------------------

    def hidden_states(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        doc_ids: torch.Tensor | None = None,  # [B, T] packed-document ids
        cache_start: int
        | None = None,  # absolute position of tokens[:, 0] when decoding with a cache
        inputs_embeds: torch.Tensor | None = None,  # [B, T, D] instead of embedding `tokens`
        before_layers: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]; the loss is computed from these in chunks.

        `before_layers` {i: f} applies f to the hidden states [B, T, D] in front of decoder
        layer i (i = n_layers: after the last, before the final norm): how a fusion model
        runs its cross-attention layers without the decoder holding them (herd.models.fusion,
        herd.models.mllama)."""
        B, T = tokens.shape
        limit = self.config.max_seq_len
        if (cache_start or 0) + T > limit:
            raise ValueError(
                f"Input of {(cache_start or 0) + T} tokens is longer than the model's context "
                f"of {limit} (max_seq_len); shorten it or pick a longer context=."
            )
        if doc_ids is not None and cache_start is not None:
            raise ValueError("Packed documents (doc_ids) and KV-cache decoding cannot be combined.")

        if doc_ids is not None:
            positions = document_positions(doc_ids)  # [B, T]
            backend = self.config.attention_backend
            if backend == "auto":
                backend = "flex" if tokens.is_cuda else "sdpa"
            if backend == "flex":
                mask = document_block_mask(doc_ids)  # BlockMask over [B, T, T]
            else:
                mask = document_causal_mask(doc_ids)  # [B, 1, T, T]
        elif cache_start is not None:
            positions = torch.arange(cache_start, cache_start + T, device=tokens.device).expand(
                B, T
            )
            # Query i sits at absolute position cache_start + i and sees keys 0..cache_start + i.
            keys = torch.arange(cache_start + T, device=tokens.device)
            mask = (keys[None, :] <= positions[0, :, None])[None, None]  # [1, 1, T, S]
        else:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            mask = None  # plain causal: SDPA's is_causal path
        cos, sin = self.rope(positions)  # [B, T, Hd] each

        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        before_layers = before_layers or {}
        for i, layer in enumerate(self.layers):
            if i in before_layers:
                x = before_layers[i](x)
            x = layer(x, cos, sin, mask, cache_start)
        if len(self.layers) in before_layers:
            x = before_layers[len(self.layers)](x)
        return self.norm(x)  # [B, T, D]

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]. For training use hidden_states + chunked loss."""
        return self.lm_head(self.hidden_states(tokens, **kwargs))


# ----------------------------------------------------------------------------- generation


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy; top_p < 1 is nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Llama,
    prompt: torch.Tensor,  # [B, T0]
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Autoregressive decoding -> [B, T0 + n] (n <= max_new_tokens; stops once all rows hit eos)."""
    B, T0 = prompt.shape
    total = min(T0 + max_new_tokens, model.config.max_seq_len)
    tokens = prompt
    finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    if use_cache:
        model.setup_cache(B, total)
    try:
        start = 0
        for _ in range(total - T0):
            if use_cache:
                logits = model(tokens[:, start:], cache_start=start)[:, -1]  # [B, V]
                start = tokens.shape[1]
            else:
                logits = model(tokens)[:, -1]  # [B, V]: recompute the whole prefix
            nxt = sample_next_token(logits, temperature, top_p, generator)  # [B]
            if eos_id is not None:
                nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
                finished |= nxt == eos_id
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if eos_id is not None and finished.all():
                break
    finally:
        if use_cache:
            model.clear_cache()
    return tokens


__all__ = [
    "FLAVORS",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "RMSNorm",
    "KVCache",
    "apply_rope",
    "document_causal_mask",
    "document_lengths",
    "document_positions",
    "generate",
    "rope_cos_sin",
    "RotaryFrequencies",
    "rope_inverse_frequencies",
    "sample_next_token",
]
