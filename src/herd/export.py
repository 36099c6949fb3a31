"""herd-export CKPT OUT_DIR: a trained herd language checkpoint as a Hugging Face Llama
directory (config.json, safetensors, and the tokenizer file) that
`transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)` loads unchanged; a fusion
checkpoint as its decoder in that form beside the adapters' weights (`--parts all`), or the
adapters alone (`--parts adapters`), which `model.init_from=OUT_DIR` reopens
(herd.systems.fusion_export)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from herd.data.tokenizer import HFTokenizer, TiktokenTokenizer
from herd.errors import ConfigError
from herd.models.pretrained import save_hf_checkpoint
from herd.systems.common import load_system
from herd.systems.fusion_export import PARTS, save_fusion_export
from herd.utils.cli import report_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(
    ckpt: Path, out: Path, dtype: str = "fp32", max_shard_mb: int | None = None, parts: str = "all"
) -> Path:
    system = load_system(ckpt)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(
            f"Output directory {out} is not empty; choose a new one (nothing was overwritten)."
        )
    if type(system).__name__ == "FusionSystem":
        return save_fusion_export(system, out, parts, DTYPES[dtype])
    model = getattr(system, "model", None)
    if model is None or not hasattr(model, "config"):
        raise ConfigError(f"Checkpoint {ckpt} holds no language or fusion model to export.")
    model = model.to(DTYPES[dtype])
    max_bytes = max_shard_mb * 2**20 if max_shard_mb else None
    save_hf_checkpoint(model, out, max_shard_bytes=max_bytes, tokenizer=system.tokenizer)
    tokenizer = system.tokenizer
    if isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
    elif isinstance(tokenizer, TiktokenTokenizer):
        shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="herd-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path, help="a herd checkpoint (.ckpt): language or fusion")
    parser.add_argument("out", type=Path, help="the new Hugging Face directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--max-shard-mb", type=int, default=None, help="split weights into shards of this size"
    )
    parser.add_argument(
        "--parts",
        choices=PARTS,
        default="all",
        help="fusion: the decoder too (all) or the adapters alone (adapters, finetune=adapter)",
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.ckpt, args.out, args.dtype, args.max_shard_mb, args.parts)
    except Exception as exc:
        return report_error("herd-export", exc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
