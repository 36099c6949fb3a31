"""One-GPU benchmark of the Llama 3.2 1B shape, one JSON line per measurement.

    python benchmarks/gpu.py --out results.jsonl          # on a CUDA GPU (benchmarks/gpu.sh)
    python benchmarks/gpu.py --smoke --out /tmp/x.jsonl   # the same code on CPU, tiny sizes

Measures, in this order (each line is written as soon as it is known, so a run cut short
keeps what it measured):
1. bf16 training steps at 8K tokens: herd eager and herd compiled (each decoder layer
   torch.compiled) with flex_attention over packed documents, herd and transformers with
   plain causal SDPA; tokens/s, peak memory and MFU (herd's batch_flops, the count that
   `perf/mfu` logs: attention over each document's own length, over the card's dense bf16
   peak);
2. the longest context (131072, else 65536, 32768, ...) at which one training step fits,
   full activation checkpointing, one document through flex_attention;
3. whether Transformer Engine (fp8) is installed; gpu.sh then trains with precision=fp8.
Every step is the same: bf16 autocast over fp32 weights (Lightning's bf16-mixed), herd's
chunked loss (transformers: its own loss from full logits), fused AdamW.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
import traceback

import torch

from herd.models.llama import Llama, LlamaConfig
from herd.models.pretrained import config_to_hf
from herd.systems.losses import chunked_cross_entropy
from herd.systems.techniques import apply_training_techniques


def packed_doc_ids(seq_len: int, generator: torch.Generator, min_len: int, max_len: int):
    """[1, seq_len] document ids of packed documents with lengths drawn in [min_len, max_len]."""
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(min_len, max_len + 1, (1,), generator=generator)))
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids[:seq_len][None]


def herd_step_fn(cfg: LlamaConfig, args, checkpointing: str, compiled: bool, docs: bool):
    with torch.device(args.device):  # initialised where it trains: no host copy of 1B weights
        model = Llama(cfg)
    apply_training_techniques(model.layers, checkpointing, compiled)

    def loss_fn(tokens, doc_ids):
        hidden = model.hidden_states(tokens[:, :-1], doc_ids=doc_ids if docs else None)
        return chunked_cross_entropy(hidden, model.lm_head.weight, tokens[:, 1:])[0]

    return model, loss_fn


def transformers_step_fn(cfg: LlamaConfig, args):
    import transformers

    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg), attn_implementation="sdpa")
    with torch.device(args.device):
        model = transformers.LlamaForCausalLM(hf_cfg)

    def loss_fn(tokens, doc_ids):
        return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # shifts internally

    return model, loss_fn


def time_steps(model, loss_fn, tokens, doc_ids, args, warmup: int, steps: int) -> dict:
    """Median seconds per training step (forward, backward, AdamW) and peak memory."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16):
            loss = loss_fn(tokens, doc_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "step_s": round(statistics.median(times[warmup:]), 4),
        "first_step_s": round(times[0], 2),  # includes compilation, where there is any
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "loss": round(float(loss.detach()), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON lines file to append results to")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny flavor: checks the code")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16, H100/H200")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead: the top kernels of herd and transformers steps (SDPA causal) to --out",
    )
    args = p.parse_args()

    if args.smoke:
        args.device, flavor, seq, longest = "cpu", "tiny", 128, [512, 256]
        args.steps, backend = 2, "sdpa"  # flex_attention has no backward on CPU
    else:
        args.device, flavor, seq, longest = "cuda", "llama3_2_1b", args.seq_len, None
        backend = "flex"
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    base = LlamaConfig.from_flavor(flavor, attention_backend=backend)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    out = open(args.out, "a")

    def record(row: dict) -> None:
        row = {"device": card, "torch": torch.__version__, "flavor": flavor, **row}
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        out.flush()

    def attempt(name: str, fn, *fn_args) -> bool:
        try:
            fn(*fn_args)  # its model is freed when it returns
            ok = True
        except Exception as error:  # one failed measurement must not lose the others
            traceback.print_exc()
            oom = isinstance(error, torch.OutOfMemoryError)
            record({"run": name, "error": "out of memory" if oom else repr(error)[:300]})
            ok = False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return ok

    # 1. Steps at `seq` tokens.
    tokens = torch.randint(0, base.vocab_size, (1, seq + 1), generator=generator)
    tokens = tokens.to(args.device)
    doc_ids = packed_doc_ids(seq, generator, seq // 32, seq // 2).to(args.device)

    def measure(name: str, build, docs: bool) -> None:
        model, loss_fn = build()
        result = time_steps(model, loss_fn, tokens, doc_ids, args, 3, args.steps)
        tokens_per_sec = seq / result["step_s"]
        flops = base.batch_flops((1, seq), doc_ids if docs else None) / seq  # per token
        record(
            {
                "run": name,
                "seq_len": seq,
                "documents": int(doc_ids.max()) + 1 if docs else 1,
                "tokens_per_sec": round(tokens_per_sec),
                "tflops": round(tokens_per_sec * flops / 1e12, 1),
                "mfu": round(tokens_per_sec * flops / (args.peak_tflops * 1e12), 3),
                **result,
            }
        )

    if args.profile:
        for name, build in (
            ("herd eager, sdpa causal", lambda: herd_step_fn(base, args, "none", False, False)),
            ("transformers eager, sdpa causal", lambda: transformers_step_fn(base, args)),
        ):
            model, loss_fn = build()
            time_steps(model, loss_fn, tokens, doc_ids, args, 2, 1)  # warm
            activities = [torch.profiler.ProfilerActivity.CPU]
            if args.device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                time_steps(model, loss_fn, tokens, doc_ids, args, 0, 2)
            key = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
            out.write(f"== {name}, 2 steps ==\n")
            out.write(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
            del model, loss_fn
        out.close()
        return

    plans = [
        ("herd eager, flex docs", lambda: herd_step_fn(base, args, "none", False, True), True),
        ("herd compiled, flex docs", lambda: herd_step_fn(base, args, "none", True, True), True),
        ("transformers eager, sdpa causal", lambda: transformers_step_fn(base, args), False),
        ("herd eager, sdpa causal", lambda: herd_step_fn(base, args, "none", False, False), False),
    ]
    for name, build, docs in plans:
        attempt(name, measure, name, build, docs)

    # 2. The longest context at which one step fits, full checkpointing, one document.
    for length in longest or [131072, 65536, 32768, 16384]:
        cfg = LlamaConfig.from_flavor(flavor, attention_backend=backend, max_seq_len=length)

        def one_step(length=length, cfg=cfg) -> None:
            model, loss_fn = herd_step_fn(cfg, args, "full", False, True)
            ids = torch.randint(0, cfg.vocab_size, (1, length + 1), device=args.device)
            one_doc = torch.zeros(1, length, dtype=torch.long, device=args.device)
            result = time_steps(model, loss_fn, ids, one_doc, args, 1, 1)
            record({"run": "longest step, full checkpointing", "seq_len": length, **result})

        if attempt(f"longest step at {length}", one_step):
            break

    # 3. fp8: gpu.sh trains a few steps with precision=fp8 where Transformer Engine exists.
    installed = importlib.util.find_spec("transformer_engine") is not None
    record({"run": "fp8", "transformer_engine_installed": installed})
    out.close()


if __name__ == "__main__":
    main()
