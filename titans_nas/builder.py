"""ModelSpec -> TitansLM. Straight-line: dispatch happens only through the specs' `build()`."""

from __future__ import annotations

import torch
from torch import nn

from components.block import Block
from titans_nas.model import TitansLM
from titans_nas.spec import ModelSpec
from titans_nas.tasks.base import TaskBase


def build_model(spec: ModelSpec, task: TaskBase | None = None) -> TitansLM:
    """Build the model `spec` describes, with `task`'s read-out head if the task has one (MAD
    compression). Deterministic: the same spec (its `seed` included) gives bit-identical initial
    weights, without touching the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        blocks = nn.ModuleList(
            Block(
                mixer=spec.block.build(spec.dim, spec.heads),
                norm_mixer=spec.norm.build(spec.dim),
                mlp=spec.mlp.build(spec.dim) if spec.mlp is not None else None,
                norm_mlp=spec.norm.build(spec.dim) if spec.mlp is not None else None,
            )
            for _ in range(spec.depth)
        )
        model = TitansLM(
            vocab_size=spec.vocab_size,
            dim=spec.dim,
            blocks=blocks,
            norm=spec.norm.build(spec.dim),
            tie_embeddings=spec.tie_embeddings,
        )
        model.readout = task.readout(spec.dim) if task is not None else None
        return model
