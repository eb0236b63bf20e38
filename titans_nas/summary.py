"""What `titans-nas inspect` reports: parameters per component and FLOPs per token."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from titans_nas.builder import build_model
from titans_nas.flops import flop_counter
from titans_nas.spec import ModelSpec


def param_rows(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(component, parameters, depth in the tree) rows; block indices fold into `*` so each
    component of the repeated block is summed over all blocks. The top-level rows sum to the
    model's parameter count (shared tensors counted once, as `model.parameters()` does)."""
    totals: dict[str, int] = defaultdict(int)
    order: list[str] = []
    kinds = {re.sub(r"^blocks\.\d+\.", "blocks.*.", n): type(m).__name__ for n, m in model.named_modules()}
    for name, p in model.named_parameters():
        parts = re.sub(r"^blocks\.\d+\.", "blocks.*.", name).split(".")[:-1]
        top = 3 if parts[0] == "blocks" else 1
        for depth in range(top, min(len(parts), top + 1) + 1):
            key = ".".join(parts[:depth])
            if key not in totals:
                order.append(key)
            totals[key] += p.numel()
    rows = []
    for k in order:
        level = 0 if k.count(".") < (3 if k.startswith("blocks") else 1) else 1
        rows.append((f"{k} ({kinds[k]})" if level == 0 else k, totals[k], level))
    return rows


def flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs per token of one `seq_len` sequence, counted by torch's FlopCounterMode on
    the meta device (no memory is allocated, nothing runs). Matmuls and attention only."""
    with torch.device("meta"):
        model = build_model(spec).requires_grad_(False)
        tokens = torch.zeros(1, seq_len, dtype=torch.long)
    with flop_counter() as counter, torch.no_grad():
        model(tokens)
    return counter.get_total_flops() / seq_len
