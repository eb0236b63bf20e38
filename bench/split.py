"""Where a memory kind's training step goes at study sizes: each memory kind timed with its memory
op (eqs. 12-16, the chunk loop and its backward) and with the op swapped for a pass-through
(`models.remove_memory_op`: everything else keeps its forward and backward), next to `swa`, side
by side in one process. The op's share of the step is the difference; the rest is what a memory
kind pays besides its memory (projections, conv, gates, norms, attention for the hybrids).

    python bench/split.py --out docs/bench/split.jsonl
    python bench/split.py --quick                       # dim 64, 256 tokens, 1 thread
    python bench/report.py split docs/bench/split.jsonl

A study's own trials, from their spec files (`impl`, `dim`, `heads` and `depth` then only label
the row: give the spec's own; the quickstart's sizes):

    python bench/split.py --group '[{"impl": "mal", "spec": "runs/quickstart/trials/<id>/spec.yaml",
        "batch": 32, "seq": 64}, {"impl": "mal", "spec": "...", "batch": 32, "seq": 64, "memory_op": "off"}]'
"""

from __future__ import annotations

from harness import main
from models import MEMORY_KINDS, make_step
from study import DEFAULTS as STUDY

DEFAULTS = {**STUDY, "memory_op": "on"}


def suite(quick: bool) -> list[list[dict]]:
    sizes = [(64, 256)] if quick else [(32, 256), (64, 256), (128, 256), (64, 1024)]
    threads = (1,) if quick else (1, 2)
    group = lambda d, n, t: [  # noqa: E731
        {"impl": "swa", "dim": d, "seq": n, "threads": t},
        *[{"impl": k, "dim": d, "seq": n, "threads": t, "memory_op": op} for k in MEMORY_KINDS for op in ("on", "off")],
    ]
    return [group(d, n, t) for t in threads for d, n in sizes]


if __name__ == "__main__":
    main(__doc__, DEFAULTS, suite, make_step)
