"""Forward + backward time of torch's CPU attention kernel in fp32 and in bf16, by key count
and head dimension: where bf16 is the slower one, herd.models.llama.attention computes in fp32
(CPU_BF16_ATTENTION_MAX_KEYS). GQA (8 query heads, 2 KV heads), a boolean causal mask, and
4096 query rows per call (batch x length), as in the digits recipe's stages. Second table:
the causal mask's whole square in one call against herd.models.llama.causal_attention's
query blocks (each over the keys up to its end), both under attention()'s rule.

    .venv/bin/python benchmarks/cpu_bf16_attention.py   # ~3 minutes on 2 cores, alone
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from herd.models.llama import attention, causal_attention


def seconds(
    dtype: torch.dtype, keys: int, head_dim: int, batch: int, kernel=F.scaled_dot_product_attention
) -> float:
    q = torch.randn(batch, 8, keys, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, 2, keys, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, 2, keys, head_dim, dtype=dtype, requires_grad=True)
    mask = torch.ones(keys, keys, dtype=torch.bool).tril().expand(batch, 1, keys, keys)

    def step() -> None:
        out = kernel(q, k, v, mask, enable_gqa=True)
        out.sum().backward()

    step()  # warm-up
    repeats = max(3, 2**22 // (batch * keys * keys))
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| head dim | keys | batch | fp32 ms | bf16 ms | bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    for head_dim in (32, 64, 128):
        for keys in (128, 256, 384, 512, 1024, 2048):
            batch = max(1, 4096 // keys)
            fp32 = seconds(torch.float32, keys, head_dim, batch)
            bf16 = seconds(torch.bfloat16, keys, head_dim, batch)
            print(
                f"| {head_dim} | {keys} | {batch} | {fp32 * 1e3:.1f} | {bf16 * 1e3:.1f} "
                f"| {bf16 / fp32:.2f} |"
            )
    print("\n| head dim | keys | batch | dtype | whole square ms | query blocks ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for head_dim in (32, 64):
        for keys in (512, 1024, 2048):
            batch = max(1, 4096 // keys)
            for dtype in (torch.float32, torch.bfloat16):
                whole = seconds(dtype, keys, head_dim, batch, attention)
                blocks = seconds(dtype, keys, head_dim, batch, causal_attention)
                print(
                    f"| {head_dim} | {keys} | {batch} | {str(dtype)[6:]} | {whole * 1e3:.1f} "
                    f"| {blocks * 1e3:.1f} | {whole / blocks:.2f} |"
                )


if __name__ == "__main__":
    main()
