"""Training throughput of herd's decoder against Hugging Face transformers' LlamaForCausalLM.

Both models get the same architecture and weights, the same batch and an AdamW step; the
loss is herd's chunked cross-entropy for herd and transformers' own loss for transformers.
Reports median tokens/s over the timed steps and peak memory where measurable.

    .venv/bin/python benchmarks/throughput.py                    # CPU, small flavor, 512 tokens
    .venv/bin/python benchmarks/throughput.py --device cuda --flavor llama3_2_1b --seq-len 8192 \
        --batch-size 1 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from herd.models.llama import Llama, LlamaConfig
from herd.models.pretrained import config_to_hf
from herd.systems.losses import chunked_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def herd_step(model, tokens, chunk):
    hidden = model.hidden_states(tokens[:, :-1])
    loss, _ = chunked_cross_entropy(hidden, model.lm_head.weight, tokens[:, 1:], chunk)
    return loss


def hf_step(model, tokens, chunk):
    return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1].clone()).loss  # shifts inside


def build(name: str, cfg: LlamaConfig, device, dtype):
    torch.manual_seed(0)
    if name == "herd":
        return Llama(cfg).to(device=device, dtype=dtype), herd_step
    import transformers

    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=dtype), hf_step


def measure(name, cfg, args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model, step = build(name, cfg, device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(model, tokens, args.loss_chunk)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    n_tokens = args.batch_size * args.seq_len
    result = {
        "impl": name,
        "tokens_per_sec": n_tokens / statistics.median(times),
        "loss": float(loss),
    }
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--impls", default="herd,transformers")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    overrides = {"max_seq_len": args.seq_len}
    if args.vocab_size:
        overrides["vocab_size"] = args.vocab_size
    cfg = LlamaConfig.from_flavor(args.flavor, **overrides)
    results = [measure(name, cfg, args) for name in args.impls.split(",")]
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    )
    print(
        f"{args.flavor} | seq {args.seq_len} x batch {args.batch_size} | {args.dtype} | {device} | torch {torch.__version__}"
    )
    print("| impl | tokens/s | rel. to transformers | peak mem (GB) |\n|---|---|---|---|")
    base = next((r["tokens_per_sec"] for r in results if r["impl"] == "transformers"), None)
    for r in results:
        rel = f"{r['tokens_per_sec'] / base:.2f}x" if base else "-"
        print(
            f"| {r['impl']} | {r['tokens_per_sec']:.0f} | {rel} | {r.get('peak_mem_gb', float('nan')):.2f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "device": device, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
