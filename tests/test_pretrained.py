"""Real Llama checkpoints: parity with transformers, Meta layout, export, bad files."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from herd.errors import ConfigError
from herd.models.llama import generate
from herd.models.pretrained import load_pretrained_llama, save_hf_checkpoint

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def small_hf_config(**overrides):
    """A transformers LlamaConfig at test size (GQA: 4 heads, 2 KV heads)."""
    fields = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=160,
        vocab_size=300,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        rope_theta=500000.0,
    )
    return transformers.LlamaConfig(**{**fields, **overrides})


def hf_model(tmp_path, scaled: bool, tied: bool = False, shard: bool = False):
    """A small random transformers Llama saved with save_pretrained."""
    cfg = small_hf_config(rope_scaling=LLAMA3_SCALING if scaled else None, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / ("hf_scaled" if scaled else "hf")
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    return model, path


@pytest.mark.parametrize("scaled", [False, True], ids=["plain_rope", "llama3_rope"])
def test_logits_match_transformers_including_positions_past_the_original_context(tmp_path, scaled):
    reference, path = hf_model(tmp_path, scaled)
    model = load_pretrained_llama(path).eval()
    assert (model.config.rope_scaling is not None) == scaled
    tokens = torch.randint(0, 300, (2, 200))  # 200 > original_max_position_embeddings=64
    with torch.no_grad():
        expected = reference(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_inverse_frequencies_are_bit_identical_to_transformers(tmp_path):
    reference, path = hf_model(tmp_path, scaled=True)
    model = load_pretrained_llama(path)
    assert torch.equal(model.rope.inv_freq, reference.model.rotary_emb.inv_freq.float())


def test_greedy_generation_with_kv_cache_matches_transformers(tmp_path):
    reference, path = hf_model(tmp_path, scaled=True)
    model = load_pretrained_llama(path).eval()
    prompt = torch.randint(0, 300, (1, 10))
    ours = generate(model, prompt, max_new_tokens=30)
    theirs = reference.generate(
        prompt,
        max_new_tokens=30,
        do_sample=False,
        min_new_tokens=30,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_round_trips_through_transformers(tmp_path, tied):
    reference, path = hf_model(tmp_path, scaled=True, tied=tied)
    model = load_pretrained_llama(path).eval()
    out = save_hf_checkpoint(model, tmp_path / "export")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 300, (1, 90))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=1e-5
        )
    assert (
        dataclasses.replace(load_pretrained_llama(out).config, flavor=model.config.flavor)
        == model.config
    )


def test_sharded_safetensors_load(tmp_path):
    reference, path = hf_model(tmp_path, scaled=False, shard=True)
    assert (path / "model.safetensors.index.json").is_file()
    model = load_pretrained_llama(path).eval()
    tokens = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens).logits, atol=1e-4, rtol=1e-4)


def to_meta_layout(hf_path, meta_path, n_shards: int = 1):
    """Write the same weights in Meta's consolidated layout (interleaved RoPE rows)."""
    from herd.models.pretrained import META_NAMES

    model = load_pretrained_llama(hf_path)
    cfg = model.config
    inverse = {v: k for k, v in META_NAMES.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        key = ".".join("{i}" if p.isdigit() else p for p in parts)
        meta_name = inverse[key].replace("{i}", next((p for p in parts if p.isdigit()), ""))
        heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}.get(parts[-2])
        if heads:  # half-split rows back to interleaved pairs
            hd = cfg.head_dim
            tensor = (
                tensor.view(heads, 2, hd // 2, cfg.dim).transpose(1, 2).reshape(heads * hd, cfg.dim)
            )
        state[meta_name] = tensor.clone()
    meta_path.mkdir()
    from herd.models.pretrained import META_SHARD_DIM

    for rank in range(n_shards):  # model-parallel shards, split as Meta's Llama 3 releases are
        shard = {}
        for name, tensor in state.items():
            dim = META_SHARD_DIM.get(name.split(".")[-2])
            shard[name] = tensor if dim is None else tensor.chunk(n_shards, dim=dim)[rank].clone()
        torch.save(shard, meta_path / f"consolidated.{rank:02d}.pth")
    params = {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "multiple_of": 32,
        "ffn_dim_multiplier": 0.9375,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "use_scaled_rope": False,
    }
    (meta_path / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_gives_the_same_logits_as_the_hf_layout(tmp_path, n_shards):
    _, hf_path = hf_model(tmp_path, scaled=False)
    to_meta_layout(hf_path, tmp_path / "meta", n_shards)
    hf, meta = (
        load_pretrained_llama(hf_path).eval(),
        load_pretrained_llama(tmp_path / "meta").eval(),
    )
    assert meta.config.ffn_dim == 160  # from dim, multiple_of and ffn_dim_multiplier
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(meta(tokens), hf(tokens), atol=1e-6, rtol=1e-6)


def test_bad_checkpoints_name_the_file_and_key(tmp_path):
    _, path = hf_model(tmp_path, scaled=False)
    config = json.loads((path / "config.json").read_text())

    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 301}))
    with pytest.raises(
        ConfigError,
        match=r"(embed_tokens|lm_head).weight has shape \(300, 64\) but the config implies \(301, 64\)",
    ):
        load_pretrained_llama(path)

    (path / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    )
    with pytest.raises(ConfigError, match="rope_type 'yarn' is not supported"):
        load_pretrained_llama(path)

    (path / "config.json").write_text(json.dumps(config))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="model.safetensors is truncated or corrupt"):
        load_pretrained_llama(path)

    with pytest.raises(ConfigError, match="does not exist"):
        load_pretrained_llama(tmp_path / "nowhere")


def tiny_hf_checkpoint_with_tokenizer(path):
    """A random Llama with herd's bundled tokenizer, saved as a Hugging Face directory."""
    from importlib.resources import files

    from herd.data.tokenizer import load_tokenizer

    vocab = load_tokenizer("herd_bpe").vocab_size  # 4096 BPE tokens and <|video|>
    cfg = small_hf_config(vocab_size=vocab, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "tokenizer.json").write_bytes(
        (files("herd.assets") / "tokenizers" / "python_docs_bpe_4k.json").read_bytes()
    )
    return path


@pytest.mark.slow
def test_full_finetuning_through_hydra_then_export_to_transformers(train_cfg, tmp_path):
    from herd.export import export
    from herd.systems.common import load_system
    from herd.train import train

    ckpt_dir = tiny_hf_checkpoint_with_tokenizer(tmp_path / "tiny-llama")
    cfg = train_cfg(
        "experiment=language_finetune",
        f"pretrained={ckpt_dir}",
        "trainer.max_steps=30",
        "trainer.val_check_interval=15",
        "model.optimizer.lr=3e-3",
        "model.scheduler.warmup_steps=5",
    )
    metrics = train(cfg)
    assert metrics["val/loss"] < 7.0  # from ln(4096) = 8.3 at random init

    last = f"{cfg.paths.output_dir}/checkpoints/last.ckpt"
    system = load_system(last)  # rebuilt from the saved config, not from ckpt_dir
    assert system.hparams.pretrained is None and system.model.config.dim == 64

    out = export(last, tmp_path / "exported")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 4096, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(tokens).logits, system.model.eval()(tokens), atol=1e-4, rtol=1e-4
        )
    assert (out / "tokenizer.json").is_file()
