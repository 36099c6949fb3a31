"""Every config composes and instantiates; impossible combinations stop before any work."""

from __future__ import annotations

import contextlib
from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from herd.errors import ConfigError
from herd.models.llama import LLAMA31_SCALING
from herd.train import CONFIG_DIR, instantiate_all
from herd.utils import preflight
from herd.utils.preflight import check_context, check_hardware

from .conftest import compose_cfg

CONFIGS = Path(CONFIG_DIR)
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
CONTEXTS = sorted(p.stem for p in (CONFIGS / "context").glob("*.yaml"))


def instantiate_everything(cfg):
    """What herd-train builds before fit, with the model on the meta device (no memory)."""
    datamodule = hydra.utils.instantiate(cfg.data)
    # a fresh model is built on the meta device (no memory); a pretrained one is small here
    pretrained = cfg.get("pretrained") or cfg.model.get("pretrained")
    device = contextlib.nullcontext() if pretrained else torch.device("meta")
    with device:
        system = hydra.utils.instantiate(cfg.model, _recursive_=False)
    callbacks = instantiate_all(cfg.callbacks)
    loggers = instantiate_all(cfg.logger)
    return datamodule, system, callbacks, loggers


def required_overrides(experiment: str, tmp_path: Path) -> list[str]:
    """Experiments with mandatory values (`???`) get a small real stand-in."""
    if experiment == "language_finetune":
        transformers = pytest.importorskip("transformers")
        from .test_pretrained import tiny_hf_checkpoint_with_tokenizer

        del transformers
        return [f"pretrained={tiny_hf_checkpoint_with_tokenizer(tmp_path / 'ckpt')}"]
    if experiment == "context_extension":
        return [f"short_ckpt={small_language_checkpoint(tmp_path / 'short.ckpt')}"]
    if experiment == "fusion_manifest":  # a released Llama is tested in test_chat_manifest
        from .test_chat_manifest import EXAMPLE

        return ["pretrained=null", f"data.manifest={EXAMPLE}"]
    if experiment == "vision_llama32_11b":  # a tiny random release stands in for the 11B
        pytest.importorskip("transformers")
        from .test_mllama import tiny_mllama_with_tokenizer

        return [f"pretrained={tiny_mllama_with_tokenizer(tmp_path / 'release')}"]
    return []


def small_language_checkpoint(path: Path) -> Path:
    """A LanguageSystem checkpoint (small flavor, 512 tokens) written as herd-train writes them."""
    import lightning as L

    from herd.systems.language import LanguageSystem

    system = LanguageSystem(llama={"flavor": "small", "max_seq_len": 512})
    trainer = L.Trainer(
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(system)
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path):
    overrides = [f"experiment={experiment}", *required_overrides(experiment, tmp_path)]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    datamodule, system, callbacks, loggers = instantiate_everything(cfg)
    if "seq_len" in datamodule.hparams:  # text stages; vision classifiers have no context
        assert system.model.config.max_seq_len == cfg.context.seq_len == datamodule.hparams.seq_len
        assert system.model.config.vocab_size >= datamodule.tokenizer.vocab_size
    # every experiment keeps checkpoints and writes TensorBoard
    assert any(isinstance(c, ModelCheckpoint) for c in callbacks)
    assert any(isinstance(lg, TensorBoardLogger) for lg in loggers)


def _leaves(node: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a YAML mapping (lists are leaves)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _base_overrides(defaults: list) -> list[tuple[str, str | None]]:
    """An experiment's defaults list as command-line overrides: (override, the group it
    picks, or None for a parent experiment or an added group)."""
    out = []
    for entry in defaults:
        if entry == "_self_":
            continue
        if isinstance(entry, str):  # a parent experiment
            out.append((f"experiment={entry}", None))
            continue
        ((key, value),) = entry.items()
        group = key.removeprefix("override ").lstrip("/")
        if key.startswith("override "):
            out.append((f"{group}={value}", group))
        else:
            out.append((f"+{group}={value}", None))
    return out


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_no_experiment_restates_a_default(experiment, tmp_path):
    """An experiment holds only what differs from what it builds on (its defaults list):
    no group choice and no value equal to the one it would have anyway."""
    import yaml
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    raw = yaml.safe_load((CONFIGS / "experiment" / f"{experiment}.yaml").read_text())
    base = _base_overrides(raw.pop("defaults", []))
    # mandatory values, added whether or not what the experiment builds on has the key
    required = [f"++{o}" for o in required_overrides(experiment, tmp_path)]
    restated = []
    for override, group in base:
        # pinning an ablation axis is not restating: a study's arm stays what it is when
        # the default moves
        if group is None or group in ("context", "precision", "strategy"):
            continue
        others = [o for o, _ in base if o != override]
        compose_cfg("train", [*others, *required], tmp_path / "run")
        if HydraConfig.get().runtime.choices.get(group) == override.split("=", 1)[1]:
            restated.append(f"defaults: {override}")
    cfg = compose_cfg("train", [o for o, _ in base] + required, tmp_path / "run")
    for key, value in _leaves(raw):
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        before = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
        if key != "tags" and before == value:
            restated.append(f"{key}: {value!r}")
    assert not restated, f"experiment={experiment} restates defaults: {restated}"


@pytest.mark.parametrize("context", CONTEXTS)
def test_context_sets_model_and_data_lengths_and_rope_scaling(context, tmp_path):
    cfg = compose_cfg("train", [f"context={context}"], tmp_path / "run")
    _, system, _, _ = instantiate_everything(cfg)
    config = system.model.config
    assert config.max_seq_len == cfg.data.seq_len == cfg.context.seq_len
    # llama3 scaling exactly when the context exceeds the 8K pre-training length
    assert (config.rope_scaling is not None) == (config.max_seq_len > 8192)
    assert config.rope_scaling in (None, LLAMA31_SCALING)  # Llama 3.1's, as released
    assert system.hparams.loss_chunk_size == cfg.context.loss_chunk_size


@pytest.mark.parametrize(
    "precision", ["fp32", "bf16_mixed", "bf16_true", "fp16_mixed", "fp8", "auto"]
)
@pytest.mark.parametrize("strategy", ["single", "ddp", "ddp_spawn", "fsdp", "deepspeed"])
def test_precision_and_strategy_compose(precision, strategy, tmp_path):
    cfg = compose_cfg("train", [f"precision={precision}", f"strategy={strategy}"], tmp_path / "run")
    assert cfg.trainer.precision and cfg.trainer.strategy
    gpu_only = strategy in ("fsdp", "deepspeed") or precision in ("fp16_mixed", "fp8")
    if not gpu_only:
        check_hardware(cfg)
    elif torch.cuda.is_available():
        pytest.skip("the GPU-only options are checked on the GPU machine")
    else:
        with pytest.raises(ConfigError, match="needs (a )?CUDA GPU"):
            check_hardware(cfg)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_native(native, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "native_bf16", lambda: native)
    cfg = compose_cfg("train", ["precision=auto"], tmp_path / "run")
    assert cfg.trainer.precision == ("bf16-mixed" if native else "32-true")


def test_eval_config_composes(tmp_path):
    cfg = compose_cfg("eval", ["ckpt_path=some.ckpt", "data=text"], tmp_path / "run")
    assert cfg.data.seq_len == cfg.context.seq_len


def test_eval_takes_the_checkpoint_data_config_resolved_at_its_own_context(tmp_path):
    from omegaconf import OmegaConf

    from herd.evaluate import resolve_data_config

    trained = OmegaConf.to_container(
        compose_cfg("train", ["data.source=pydoc"], tmp_path / "train").data, resolve=False
    )
    cfg = compose_cfg(
        "eval", ["ckpt_path=x.ckpt", "context=2k", "++data.batch_size=2"], tmp_path / "run"
    )
    resolve_data_config(cfg, {"data": trained})
    assert cfg.data.source == "pydoc" and cfg.data.batch_size == 2
    assert cfg.data.seq_len == 2048  # ${context.seq_len} follows this command's context=

    # a fusion checkpoint's lead-in is a training schedule: testing one task ignores it
    fusion = OmegaConf.to_container(
        compose_cfg(
            "train",
            [
                "experiment=fusion_digits",
                "data.lead_in_weights={passkey:1.0}",
                "data.lead_in_steps=8",
            ],
            tmp_path / "fusion",
        ).data,
        resolve=False,
    )
    cfg = compose_cfg(
        "eval",
        ["ckpt_path=x.ckpt", "++data.weights={image:0,asr:1,st:0,mt:0,passkey:0}"],
        tmp_path / "run3",
    )
    resolve_data_config(cfg, {"data": fusion})
    assert cfg.data.lead_in_weights is None and cfg.data.lead_in_steps == 0
    assert cfg.data.weights.asr == 1 and cfg.data.weights.passkey == 0

    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt"], tmp_path / "run2")
    with pytest.raises(ConfigError, match="does not record its data config"):
        resolve_data_config(cfg, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=fsdp"], r"strategy=fsdp \(FSDP\) needs CUDA GPUs .* use strategy=ddp_spawn"),
        (
            ["precision=fp16_mixed"],
            r"precision=fp16_mixed .* use precision=bf16_mixed or precision=fp32",
        ),
        (["trainer.accelerator=gpu"], r"no CUDA GPU is visible; use trainer.accelerator=cpu"),
        (["strategy=deepspeed"], r"strategy=deepspeed \(DeepSpeed\) needs CUDA GPUs"),
        (["precision=fp8"], r"precision=fp8 \(transformer-engine\) needs a CUDA GPU"),
    ],
)
def test_gpu_only_options_are_refused_on_cpu(overrides, message, tmp_path):
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    with pytest.raises(ConfigError, match=message):
        check_hardware(cfg)


def test_fsdp_strategy_shards_each_block(tmp_path):
    """strategy=fsdp builds Lightning's FSDPStrategy with one unit per decoder block and
    encoder layer (constructing it needs no GPU; running it does)."""
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy

    from herd.models.llama import DecoderLayer
    from herd.models.vision import GatedCrossAttention

    cfg = compose_cfg("train", ["strategy=fsdp"], tmp_path / "run")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    wrapped = strategy.kwargs["auto_wrap_policy"]._module_classes
    assert {DecoderLayer, GatedCrossAttention} <= set(wrapped)
    assert cfg.trainer.gradient_clip_val is None


def test_a_missing_optional_package_is_named(tmp_path, monkeypatch):
    """On a GPU machine without the extra, deepspeed / fp8 stop before training and say
    which extra to install."""
    from herd.utils import preflight

    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(preflight.importlib.util, "find_spec", lambda name: None)
    for override, message in (
        ("strategy=deepspeed", r"deepspeed needs the deepspeed package.*\.\[deepspeed\]"),
        ("precision=fp8", r"needs the transformer_engine package.*\.\[fp8\]"),
    ):
        cfg = compose_cfg("train", [override], tmp_path / override)
        with pytest.raises(ConfigError, match=message):
            check_hardware(cfg)


def test_overriding_one_length_without_the_other_is_refused(tmp_path):
    cfg = compose_cfg("train", ["data.seq_len=1024"], tmp_path / "run")
    with pytest.raises(
        ConfigError, match="data.seq_len=1024 is longer than the model's max_seq_len=512"
    ):
        check_context(cfg)
