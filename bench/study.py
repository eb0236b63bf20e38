"""Benchmark at study sizes: the six block kinds side by side as a study trains them (2 blocks,
2 heads, batch 16, memory chunk 16, window / segment 32, 4 persistent tokens), forward+backward
tokens/s at dim 32 / 64 / 128 and 256 / 1024 tokens, on 1 and on 2 threads. The ratio that
matters is each memory kind's tokens/s over `swa`'s in the same group (docs/benchmarks.md).

    python bench/study.py --out docs/bench/study.jsonl
    python bench/study.py --quick                      # dim 64, 256 tokens only
"""

from __future__ import annotations

from harness import main
from models import KINDS, make_step

DEFAULTS = {
    "impl": "swa",
    "mode": "fwdbwd",
    "seq": 256,
    "dim": 64,
    "depth": 2,
    "heads": 2,
    "batch": 16,
    "threads": 1,
    "chunk": 16,
    "window": 32,
    "segment": 32,
    "persistent": 4,
}


def suite(quick: bool) -> list[list[dict]]:
    sizes = [(64, 256)] if quick else [(d, n) for d in (32, 64, 128) for n in (256, 1024)]
    return [
        [{"impl": k, "dim": d, "seq": n, "threads": t, "rounds": 3 if n > 256 else 5} for k in KINDS]
        for t in (1, 2)
        for d, n in sizes
    ]


if __name__ == "__main__":
    main(__doc__, DEFAULTS, suite, make_step)
