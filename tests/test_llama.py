"""The decoder: shapes, causality, GQA, RoPE scaling, document masking, KV cache, sampling."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from herd.errors import ConfigError
from herd.models.llama import (
    CPU_BF16_ATTENTION_MAX_KEYS,
    FLAVORS,
    LLAMA31_SCALING,
    Attention,
    Llama,
    LlamaConfig,
    RopeScaling,
    causal_attention,
    document_causal_mask,
    document_lengths,
    document_positions,
    generate,
    rope_cos_sin,
    rope_inverse_frequencies,
    sample_next_token,
)
from herd.models.llama import attention as herd_attention


def tiny(**overrides) -> LlamaConfig:
    return LlamaConfig.from_flavor("tiny", **overrides)


def test_output_shape_and_dtype():
    model = Llama(tiny())
    tokens = torch.randint(0, 512, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, 512)
    assert logits.dtype == torch.float32
    assert model.hidden_states(tokens).shape == (3, 17, 64)


def test_causality_future_tokens_never_change_past_logits():
    model = Llama(tiny()).eval()
    tokens = torch.randint(0, 512, (2, 24))
    base = model(tokens)
    for t in (0, 7, 23):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 512
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def reference_attention(attn: Attention, x, cos, sin):
    """Textbook multi-head causal attention with explicit softmax, for comparison."""
    from herd.models.llama import apply_rope

    B, T, _ = x.shape
    H, Hd = attn.n_heads, attn.head_dim
    q = apply_rope(attn.q_proj(x).view(B, T, H, Hd).transpose(1, 2), cos, sin)
    k = apply_rope(attn.k_proj(x).view(B, T, H, Hd).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, H, Hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * Hd))


def test_attention_with_kv_heads_equal_to_heads_is_plain_multi_head_attention():
    cfg = tiny(n_kv_heads=4)
    attn = Attention(cfg)
    x = torch.randn(2, 10, cfg.dim)
    cos, sin = rope_cos_sin(
        torch.arange(10).expand(2, 10), rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, None)
    )
    torch.testing.assert_close(
        attn(x, cos, sin, None), reference_attention(attn, x, cos, sin), atol=1e-5, rtol=1e-5
    )


def test_grouped_query_attention_equals_multi_head_attention_with_shared_kv_heads():
    gqa_cfg, mha_cfg = tiny(n_kv_heads=2), tiny(n_kv_heads=4)
    gqa, mha = Attention(gqa_cfg), Attention(mha_cfg)
    hd = gqa_cfg.head_dim
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # each KV head serves 2 consecutive query heads
            w = getattr(gqa, name).weight.view(2, hd, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(4 * hd, -1))
    x = torch.randn(2, 12, gqa_cfg.dim)
    cos, sin = rope_cos_sin(
        torch.arange(12).expand(2, 12), rope_inverse_frequencies(hd, 500000.0, None)
    )
    torch.testing.assert_close(gqa(x, cos, sin, None), mha(x, cos, sin, None), atol=1e-6, rtol=1e-5)


def test_llama3_scaled_frequencies_match_a_hand_computed_reference():
    scaling = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192
    )
    head_dim, theta = 128, 500000.0
    got = rope_inverse_frequencies(head_dim, theta, scaling)
    expected = []
    for i in range(0, head_dim, 2):  # the formula of the Llama 3.1 release, one frequency at a time
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            expected.append(freq)
        elif wavelen > 8192 / 1:
            expected.append(freq / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * freq / 8 + smooth * freq)
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)
    # All three regimes occur at the 8B's head size.
    plain = rope_inverse_frequencies(head_dim, theta, None)
    assert (
        (got == plain).any()
        and (got == plain / 8).any()
        and ((got != plain) & (got != plain / 8)).any()
    )


def test_document_positions_and_mask():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = document_causal_mask(doc_ids)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False]
    assert mask[2].tolist() == [True, True, True, False, False, False]


def test_batch_flops_count_attention_within_each_document():
    cfg = tiny()
    rows = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, -1, -1]])  # a row's padding is a run
    assert document_lengths(rows).tolist() == [3, 2, 1, 4, 2]
    expected = sum(n * cfg.flops_per_token(n) for n in (3, 2, 1, 4, 2))
    assert cfg.batch_flops((2, 6), rows) == pytest.approx(expected)
    # without documents every token attends the whole row: the most a batch can count
    assert cfg.batch_flops((2, 6)) == pytest.approx(12 * cfg.flops_per_token(6))
    assert cfg.batch_flops((2, 6)) > expected


def test_a_document_packed_in_a_row_gets_the_logits_it_gets_alone():
    model = Llama(tiny()).eval()
    a, b, c = torch.randint(0, 512, (5,)), torch.randint(0, 512, (9,)), torch.randint(0, 512, (4,))
    row = torch.cat([a, b, c])[None]
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 4])
    packed = model(row, doc_ids=doc_ids)
    torch.testing.assert_close(packed[0, 5:14], model(b[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 14:], model(c[None])[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_equals_recomputing_the_prefix():
    model = Llama(tiny()).eval()
    prompt = torch.randint(0, 512, (2, 7))
    cached = generate(model, prompt, max_new_tokens=20, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=20, use_cache=False)
    assert cached.shape == (2, 27)
    assert torch.equal(cached, uncached)
    # incremental logits equal full-sequence logits position by position
    model.setup_cache(2, 27)
    steps = [model(cached[:, :7], cache_start=0)]
    steps += [model(cached[:, t : t + 1], cache_start=t) for t in range(7, 26)]
    model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), model(cached[:, :26]), atol=1e-5, rtol=1e-5)


def test_generation_stops_at_eos_and_pads_finished_rows():
    model = Llama(tiny()).eval()
    with torch.no_grad():  # all logits 0: greedy decoding picks token 0 every time
        model.norm.weight.zero_()
    prompt = torch.randint(1, 512, (2, 4))
    assert generate(model, prompt, max_new_tokens=10, eos_id=0).tolist() == [
        p + [0] for p in prompt.tolist()
    ]
    assert generate(model, prompt, max_new_tokens=10).shape == (2, 14)


def test_top_p_sampling_never_leaves_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {
        int(sample_next_token(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(300)
    }
    assert draws == {0, 1}
    assert int(sample_next_token(logits)) == 0  # temperature 0 is greedy


def test_input_longer_than_the_context_is_refused():
    model = Llama(tiny(max_seq_len=16))
    with pytest.raises(ValueError, match="longer than the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_release_flavors_have_their_published_sizes():
    assert abs(FLAVORS["llama3_1_8b"].num_params() / 1e9 - 8.03) < 0.01
    assert abs(FLAVORS["llama3_2_1b"].num_params() / 1e9 - 1.24) < 0.01
    assert abs(FLAVORS["llama3_1_70b"].num_params() / 1e9 - 70.55) < 0.05


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_heads": 3}, "dim 64 is not divisible by n_heads 3"),
        ({"n_kv_heads": 3}, "n_heads 4 is not divisible by n_kv_heads 3"),
        ({"max_seq_len": 16384}, "no rope_scaling is set"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "rope_type='yarn' is not supported"),
    ],
)
def test_invalid_configs_are_refused_with_the_culprit_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_unknown_flavor_is_refused():
    with pytest.raises(ConfigError, match="Unknown Llama flavor 'llama9'"):
        LlamaConfig.from_flavor("llama9")


def test_null_overrides_keep_the_flavors_value_for_every_field():
    # one rule, RoPE scaling included (YAML's null from configs/context/*.yaml)
    cfg = LlamaConfig.from_flavor("llama3_1_8b", dim=None, rope_scaling=None, max_seq_len=8192)
    assert cfg.dim == 4096 and cfg.rope_scaling == LLAMA31_SCALING
    # scaling off is said explicitly: factor 1 leaves every frequency as it is
    off = LlamaConfig.from_flavor("llama3_1_8b", rope_scaling={"factor": 1.0})
    torch.testing.assert_close(
        rope_inverse_frequencies(off.head_dim, off.rope_theta, off.rope_scaling),
        rope_inverse_frequencies(off.head_dim, off.rope_theta, None),
    )


def test_tied_embeddings_share_one_tensor():
    model = Llama(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == tiny(tie_embeddings=True).num_params()
    assert sum(p.numel() for p in Llama(tiny()).parameters()) == tiny().num_params()


def test_sdpa_matches_manual_attention_under_the_document_mask():
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)
    mask = document_causal_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    manual = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf")).softmax(
        -1
    ) @ v
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), manual)


@pytest.mark.parametrize("keys", [64, CPU_BF16_ATTENTION_MAX_KEYS + 64])
def test_bf16_attention_on_cpu_is_fp32_over_short_rows_and_bf16_out(keys):
    """Under bf16 autocast (RoPE leaves q and k in fp32, v is bf16) the attention over short
    rows is computed on fp32 copies, i.e. equals fp32 attention of the same values before the
    one final rounding; over long rows it is torch's bf16 kernel. Both return bf16."""
    q = torch.randn(2, 4, keys, 16)
    k, v = torch.randn(2, 2, keys, 16), torch.randn(2, 2, keys, 16).bfloat16()
    mask = document_causal_mask(torch.zeros(2, keys, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = herd_attention(q, k, v, mask, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    fp32 = F.scaled_dot_product_attention(q, k, v.float(), attn_mask=mask, enable_gqa=True)
    if keys <= CPU_BF16_ATTENTION_MAX_KEYS:
        torch.testing.assert_close(out, fp32.bfloat16(), atol=0, rtol=0)
    else:  # bf16 inputs: close to fp32, not equal to its rounding
        torch.testing.assert_close(out.float(), fp32, atol=0.05, rtol=0.05)
        assert not torch.equal(out, fp32.bfloat16())


@pytest.mark.parametrize("length", [100, 512, 777])
def test_causal_attention_in_query_blocks_is_exact(length):
    """The CPU query-block split skips only keys the causal mask hides: values and gradients
    equal one call over the whole square (one block below 256 tokens, 4 at 512, 6 at 777)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, length, 16, requires_grad=True) for _ in range(2))
    doc_ids = torch.cumsum((torch.rand(2, length) < 0.02).long(), dim=1)
    mask = document_causal_mask(doc_ids)
    blocks = causal_attention(q, k, v, mask, enable_gqa=True)
    grads = torch.autograd.grad(blocks.square().sum(), (q, k, v))
    whole = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    whole_grads = torch.autograd.grad(whole.square().sum(), (q, k, v))
    torch.testing.assert_close(blocks, whole, atol=1e-6, rtol=1e-5)
    for got, expected in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_flex_attention_path_matches_the_sdpa_path():
    """The CUDA kernel choice (flex_attention + block mask) computes the CPU path's logits;
    checked here with flex_attention's eager reference (forward only on CPU)."""
    model = Llama(tiny()).eval()
    flex_model = Llama(replace(tiny(), attention_backend="flex")).eval()
    flex_model.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 512, (2, 96))
    doc_ids = torch.cumsum((torch.rand(2, 96) < 0.05).long(), dim=1)
    with torch.no_grad():
        sdpa = model(tokens, doc_ids=doc_ids)
        flex = flex_model(tokens, doc_ids=doc_ids)
    torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


def test_rope_frequencies_stay_fp32_when_the_model_is_cast_to_bf16():
    model = Llama(tiny()).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rope.inv_freq.dtype == torch.float32
    assert torch.equal(model.rope.inv_freq, rope_inverse_frequencies(16, 500000.0, None))
