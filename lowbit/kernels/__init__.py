"""Triton GPU kernels, one per file, each with its asserting wrapper and a torch reference.

The references are the CPU path and the oracles of the tests; the kernels run on CUDA GPUs, and on the CPU under
`TRITON_INTERPRET=1` where Triton's interpreter supports their dtypes (not FP8 matrix products).

- act_quant.py        activations -> int8 per token, FP8 per token group, FP8 static per tensor (also kept in 16
                      bits on each slot's expert grid: w4a8 at small M)
- greedy.py           greedy decoding's argmax over the vocabulary, inside the decode CUDA graph
- gemv_packed.py      one row against packed int4 / int8 weights on the CUDA cores: batch-1 decode's dense layers
                      (and, with LOWBIT_GEMV_MOE=1, the one-token fused MoE)
- gqa_decode.py       paged grouped-query decode (the Llama family)
- matmul_packed.py    int4 / int8 weights packed in int32 words (w4a16, w8a16, w4a8, w4a8-int8), dequantized in
                      registers; dense or grouped by expert (fused MoE), gate and up fused with SiLU
- matmul_unpacked.py  bf16, int8 per channel (w8a8) and FP8 128x128 block (fp8-block) weights; dense or grouped
- mla_decode.py       paged MLA decode on the compressed latent, all heads of a sequence together
- mla_prep.py         MLA's decode glue: the latent's norm + rope key + cache store and the absorbed query (one
                      launch), W_UV
- moe.py              the fused MoE: tokens sorted by expert (one launch up to 256 slots; one token needs no sort),
                      one launch per projection for all experts, a token's slots summed in one
- norm_rope.py        RMSNorm and rotary embedding in one launch each (decode is launch-bound at batch 1); the
                      norm also quantizes its output to int8 per token where int8 layers read it
- pdl.py              programmatic dependent launch (Hopper): every launch's PDL keywords, the wait each kernel
                      starts with, weights read or prefetched before it
- rows.py             the GEMMs' shared row handling: grouped (MoE) rows, gate/up interleaving, stores
- router.py           the MoE router: its logits (a GEMV) and what follows them (scores, bias, group-limited
                      top-k, weights), one launch each
- split_kv.py         flash-decoding's splits of a long context and their merge in one launch
- tuning.py           launch configurations per shape range, chosen (and optionally measured) at load time
"""
from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs its kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
