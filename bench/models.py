"""Benchmark of whole models, every block kind: forward+backward tokens/s and peak RSS at 1K-16K
tokens next to full attention and titans_pytorch.MemoryAsContextTransformer 0.5.5, and
streaming inference (tokens/s, peak RSS) over 64K, 256K and 1M tokens for MAG and MAC.

Matched CPU setting: dim 256, 2 blocks, 4 heads of 64, byte vocabulary (256), batch 1; memory:
2-layer MLP x4, chunk 64; window 512 (swa/mag/mal); segment 256 (mac); 16 persistent tokens.

    python bench/models.py --out docs/bench/models.jsonl
    python bench/models.py --quick
"""

from __future__ import annotations

import resource
import time

from harness import main

DEFAULTS = {
    "impl": "attention",
    "mode": "fwdbwd",
    "seq": 1024,
    "dim": 256,
    "depth": 2,
    "heads": 4,
    "batch": 1,
    "threads": 2,
    "chunk": 64,
    "window": 512,
    "segment": 256,
    "persistent": 16,
}


def block_kinds() -> list[str]:
    """Every member of the block union (a new kind is benchmarked with no change here)."""
    from titans_nas.config import union_members
    from titans_nas.spec import BlockSpec

    return list(union_members(BlockSpec))


def kinds_with(*fields: str) -> list[str]:
    """The block kinds whose spec has all these fields (`memory`: the memory kinds)."""
    from titans_nas.config import union_members
    from titans_nas.spec import BlockSpec

    return [k for k, cls in union_members(BlockSpec).items() if all(f in cls.model_fields for f in fields)]


KINDS, MEMORY_KINDS, HYBRIDS = block_kinds(), kinds_with("memory"), kinds_with("memory", "attention")


def spec_for(cfg: dict):
    """The benchmark's model of one kind, derived from the kind's fields: windows, MAC segments,
    memory chunks (with `backend`, if given), and persistent tokens for the memory kinds (none for
    the attention baselines; none at all where `persistent` is absent or 0). With `spec`, the model
    spec file it names instead (a trial's spec.yaml, say: the size fields then only label the row)."""
    from titans_nas.config import load_spec, union_members, validate
    from titans_nas.spec import BlockSpec, ModelSpec

    if cfg.get("spec"):
        return load_spec(cfg["spec"])

    fields = union_members(BlockSpec)[cfg["impl"]].model_fields
    block = {"kind": cfg["impl"]}
    if "window" in fields:
        block["window"] = cfg["window"]
    if "segment_len" in fields:
        block["segment_len"] = cfg["segment"]
    if "memory" in fields:
        block["memory"] = {"chunk_size": cfg["chunk"]} | ({"backend": cfg["backend"]} if "backend" in cfg else {})
        if cfg.get("persistent"):
            block["persistent"] = {"num_tokens": cfg["persistent"]}
    return validate(
        {"vocab_size": 256, "dim": cfg["dim"], "depth": cfg["depth"], "heads": cfg["heads"], "block": block}, ModelSpec
    )


def make_step(cfg: dict):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    spec = spec_for(cfg) if cfg["impl"] != "titans-pytorch-mac" else None
    vocab = spec.vocab_size if spec is not None else 256
    tokens = torch.randint(0, vocab, (cfg["batch"], cfg["seq"] + 1), generator=torch.Generator().manual_seed(1))
    if spec is None:
        from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

        head_dim = cfg["dim"] // cfg["heads"]
        model = MemoryAsContextTransformer(
            num_tokens=256,
            dim=cfg["dim"],
            depth=cfg["depth"],
            segment_len=cfg["segment"],
            neural_memory_segment_len=cfg["chunk"],
            num_persist_mem_tokens=cfg["persistent"],
            num_longterm_mem_tokens=0,
            dim_head=head_dim,
            heads=cfg["heads"],
            num_residual_streams=1,
            neural_memory_model=MemoryMLP(head_dim, depth=2, expansion_factor=4.0),
            neural_memory_kwargs={"heads": cfg["heads"], "dim_head": head_dim},
        )
        loss_of = lambda: model(tokens, return_loss=True)  # noqa: E731
    else:
        from titans_nas.builder import build_model

        model = build_model(spec)
        if cfg.get("memory_op") == "off":
            remove_memory_op(model)
        if cfg.get("compiled"):  # the memory's chunk step and its backward through torch.compile
            from components.neural_memory import compile_memory

            compile_memory(model)

        def loss_of():
            logits, _ = model(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    def step():
        if cfg["mode"] == "fwd":
            with torch.no_grad():
                loss_of()
        else:
            model.zero_grad(set_to_none=True)
            loss_of().backward()

    return step, model


def remove_memory_op(model) -> None:
    """Swap every memory's op (eqs. 12-16) for a pass-through: the read is q, and k, v and the
    gates reach the loss with weight zero, so every layer before the op (projections, conv, norms,
    gates) and after it keeps its forward and backward. A step of this model is the rest of a
    memory kind's step: the op's share is the difference (bench/split.py)."""
    from components.neural_memory import NeuralMemory

    def passthrough(q, k, v, lr, momentum, decay, state, omega=None, **_):
        zero = sum(t.sum() for t in (k, v, lr, momentum, decay, omega) if t is not None) * 0
        return q + zero, state

    for m in model.modules():
        if isinstance(m, NeuralMemory):
            m.update = passthrough


def stream(cfg: dict) -> dict:
    """Feed `total` tokens in pieces of `piece` through the streaming state, no gradients; record
    tokens/s and peak RSS when 64K, 256K and 1M tokens have been read."""
    import torch

    from titans_nas.builder import build_model

    torch.set_num_threads(cfg["threads"])
    model = build_model(spec_for(cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    marks, out = {65536, 262144, 1048576}, {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.no_grad():
        state = model.init_state(cfg["batch"])
        done, t0 = 0, time.perf_counter()
        while done < cfg["total"]:
            piece = torch.randint(0, 256, (cfg["batch"], cfg["piece"]), generator=gen)
            logits, state = model(piece, state)
            done += cfg["piece"]
            if done in marks:
                out[str(done)] = {
                    "tokens_per_s": done / (time.perf_counter() - t0),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
    return {"streaming": out, "base_rss_mb": rss0, "finite": bool(torch.isfinite(logits).all())}


def suite(quick: bool) -> list[list[dict]]:
    groups = []
    for seq in [1024] if quick else [1024, 4096, 16384]:
        rounds = {"rounds": 2} if seq > 4096 else {}
        groups.append([{"impl": k, "seq": seq, **rounds} for k in [*KINDS, "titans-pytorch-mac"]])
    for kind in HYBRIDS:  # a million tokens streamed through each kind that holds memory and attention
        groups.append([{"impl": kind, "extra": "stream", "total": 65536 if quick else 1048576, "piece": 4096}])
    return groups


if __name__ == "__main__":
    main(__doc__, DEFAULTS, suite, make_step, extra=stream)
