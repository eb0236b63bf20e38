"""FLOP formulas that torch's FlopCounterMode lacks, registered on import.

On CPU, `F.scaled_dot_product_attention` runs `aten._scaled_dot_product_flash_attention_for_cpu`,
which torch 2.13 has no formula for: full attention and MAC's attention counted 0 FLOPs on CPU
tensors, while the same model on the meta device (the math path: two bmm) counted them. The CPU
kernels get the formulas of torch's CUDA flash attention (4 b h s_q s_k d forward, the whole
score matrix whatever the mask, as `sdpa_flop_count` counts it), so `inspect` (meta) and the
benchmarks (CPU) count the same FLOPs. Every count goes through `flop_counter()`.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


@register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode (no table printed) with the formulas above registered: the one
    counter of `inspect`, the benchmark harness and bench/gpu.py."""
    return FlopCounterMode(display=False)
