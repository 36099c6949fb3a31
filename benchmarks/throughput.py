"""Training step speed and peak memory of one decoder implementation, in its own process.

    python benchmarks/throughput.py --impl herd            # herd, eager
    python benchmarks/throughput.py --impl herd --compile  # herd, each block and the loss compiled
    python benchmarks/throughput.py --impl transformers    # transformers.LlamaForCausalLM (SDPA)
    python benchmarks/throughput.py --impl litgpt          # litgpt.GPT (needs .venv-bench)

Every implementation gets the same architecture (defaults: dim 512, 8 layers, 8 heads, 2 KV
heads, FFN 1536, vocab 32000), the same batch, its own usual loss, and one AdamW step per
iteration. Prints one JSON line: median tokens/s over the timed steps and the process's peak
memory (CUDA: max allocated; CPU: peak resident set size, so run one implementation per
process). `benchmarks/run.sh` runs the comparisons and writes the tables in README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def herd_model(args):
    from herd.models.llama import Llama, LlamaConfig
    from herd.systems.losses import chunked_cross_entropy
    from herd.systems.techniques import apply_training_techniques

    cfg = LlamaConfig(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=args.vocab_size,
        ffn_dim=args.ffn_dim,
        max_seq_len=args.seq_len,
        rope_scaling={"factor": 8.0} if args.seq_len > 8192 else None,
    )
    model = Llama(cfg)
    apply_training_techniques(model.layers, args.checkpointing, args.compile)

    def loss_fn(tokens):
        hidden = model.hidden_states(tokens[:, :-1])
        compiled_loss = args.compile and not args.eager_loss  # as herd-train's model.compile
        labels = tokens[:, 1:]
        return chunked_cross_entropy(
            hidden, model.lm_head.weight, labels, args.loss_chunk, compiled_loss
        )[0]

    return model, loss_fn


def transformers_model(args):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        intermediate_size=args.ffn_dim,
        vocab_size=args.vocab_size,
        max_position_embeddings=args.seq_len,
        rope_theta=500000.0,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg)
    if args.checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:
        for layer in model.model.layers:
            layer.compile()

    def loss_fn(tokens):
        return model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # shifts internally

    return model, loss_fn


def litgpt_model(args):
    from litgpt import GPT, Config
    from litgpt.utils import chunked_cross_entropy

    cfg = Config(
        n_layer=args.n_layers,
        n_head=args.n_heads,
        n_query_groups=args.n_kv_heads,
        n_embd=args.dim,
        intermediate_size=args.ffn_dim,
        vocab_size=args.vocab_size,
        padded_vocab_size=args.vocab_size,
        block_size=args.seq_len,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        rotary_percentage=1.0,
        parallel_residual=False,
        rope_base=500000,
        norm_eps=1e-5,
    )
    model = GPT(cfg)
    model.max_seq_length = args.seq_len
    if args.compile:
        for block in model.transformer.h:
            block.compile()

    def loss_fn(tokens):
        logits = model(tokens[:, :-1])
        return chunked_cross_entropy(logits, tokens[:, 1:])  # what litgpt's own training uses

    return model, loss_fn


BUILDERS = {"herd": herd_model, "transformers": transformers_model, "litgpt": litgpt_model}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=sorted(BUILDERS), required=True)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--eager-loss", action="store_true", help="herd --compile: the layers only")
    p.add_argument(
        "--checkpointing", choices=["none", "attention", "selective", "full"], default="none"
    )
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--ffn-dim", type=int, default=1536)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model, loss_fn = BUILDERS[args.impl](args)
    model.to(device=device, dtype=DTYPES[args.dtype]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1), device=device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": args.impl
                + ("+compile" if args.compile else "")
                + (" (eager loss)" if args.compile and args.eager_loss else ""),
                "checkpointing": args.checkpointing,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "tokens_per_sec": round(args.batch_size * args.seq_len / step_s, 1),
                "step_s": round(step_s, 4),
                "peak_mem_gb": round(peak_memory_gb(device), 3),
                "loss": round(float(loss), 4),
                "device": torch.cuda.get_device_name()
                if device.type == "cuda"
                else f"{platform.machine()} CPU x{torch.get_num_threads()}",
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
