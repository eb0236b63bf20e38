"""Render the JSON lines of bench/memory.py and bench/models.py as the markdown tables of
docs/benchmarks.md (ratios are taken inside one side-by-side group).

    python bench/report.py memory docs/bench/memory.jsonl
    python bench/report.py models docs/bench/models.jsonl
    python bench/report.py study docs/bench/study.jsonl
    python bench/report.py split docs/bench/split.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from models import KINDS, MEMORY_KINDS  # the block union's members (bench/models.py)


def load(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def memory_report(rows: list[dict]) -> str:
    out = []
    key = lambda r: (r["seq"], r["mode"], r["chunk"], r["depth"])  # noqa: E731
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if "error" not in r:  # our layer without its memory op is a column of its own: its rest
            groups[key(r)][r["impl"] + (" rest" if r.get("memory_op") == "off" else "")] = r
    impls = [
        "exact", "exact+compile", "coarse", "coarse+compile", "titans-pytorch", "titans-pytorch-ttt", "naive",
        "exact rest",
    ]  # fmt: skip
    out.append(
        "| seq | mode | chunk | depth | " + " | ".join(impls) + " | exact / tp | coarse / tp | coarse / tp-ttt |"
    )
    out.append("|" + "---|" * (len(impls) + 7))
    for k in sorted(groups, key=lambda k: (k[2] != 64 or k[3] != 2, k[0], k[1], k[2], k[3])):
        g = groups[k]
        tps = {i: g[i]["tokens_per_s"] if i in g else None for i in impls}

        def ratio(a, b):
            return f"{tps[a] / tps[b]:.2f}x" if tps[a] and tps[b] else "-"

        cells = [fmt(tps[i]) for i in impls]
        cells += [
            ratio("exact", "titans-pytorch"),
            ratio("coarse", "titans-pytorch"),
            ratio("coarse", "titans-pytorch-ttt"),
        ]
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | " + " | ".join(cells) + " |")
    out.append("")
    ours = impls[:6]  # the RSS and GFLOP/s tables: not the naive loop, not the rest alone
    out.append("Peak RSS (MiB; in brackets, after imports and building), forward+backward, chunk 64, depth 2:")
    out.append("")
    out.append("| seq | " + " | ".join(ours) + " |")
    out.append("|" + "---|" * (len(ours) + 1))
    for k in sorted(k for k in groups if k[1] == "fwdbwd" and k[2] == 64 and k[3] == 2):
        g = groups[k]
        cells = [f"{fmt(g[i].get('peak_rss_mb'))} ({fmt(g[i].get('base_rss_mb'))})" if i in g else "-" for i in ours]
        out.append(f"| {k[0]} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("Executed GFLOP/s (torch FlopCounterMode count of one step / best time), chunk 64, depth 2:")
    out.append("")
    out.append("| seq | mode | " + " | ".join(ours) + " |")
    out.append("|" + "---|" * (len(ours) + 2))
    for k in sorted(k for k in groups if k[2] == 64 and k[3] == 2 and k[0] > 256):
        g = groups[k]
        out.append(
            f"| {k[0]} | {k[1]} | "
            + " | ".join(fmt(g[i].get("gflop_per_s"), 1) if i in g else "-" for i in ours)
            + " |"
        )
    return "\n".join(out)


def models_report(rows: list[dict]) -> str:
    out = []
    timed = [r for r in rows if "streaming" not in r and "error" not in r]
    by_seq: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in timed:
        by_seq[r["seq"]][r["impl"]] = r
    kinds = [*KINDS, "titans-pytorch-mac"]

    def table(title: str, cell) -> None:  # one row per sequence length, one column per kind
        out.extend([title, "", "| seq | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 1)])
        for seq in sorted(by_seq):
            g = by_seq[seq]
            out.append(f"| {seq} | " + " | ".join(cell(g, g.get(k, {})) for k in kinds) + " |")
        out.append("")

    def speed(group: dict, row: dict) -> str:
        t, base = row.get("tokens_per_s"), group.get("attention", {}).get("tokens_per_s")
        return "-" if t is None else f"{t:,.0f} ({t / base:.2f}x)" if base else f"{t:,.0f}"

    table("Forward+backward tokens/s (in brackets: relative to full attention at that length):", speed)
    table("Peak RSS, forward+backward (MiB):", lambda group, row: fmt(row.get("peak_rss_mb")))
    out.append(
        "MAC: ours relative to titans-pytorch's MemoryAsContextTransformer at the same length: "
        + ", ".join(
            f"{seq}: {by_seq[seq]['mac']['tokens_per_s'] / by_seq[seq]['titans-pytorch-mac']['tokens_per_s']:.2f}x"
            for seq in sorted(by_seq)
            if "mac" in by_seq[seq] and "titans-pytorch-mac" in by_seq[seq]
        )
    )
    streams = [r for r in rows if "streaming" in r]
    if streams:
        out.append("")
        out.append("Streaming inference (no gradients, pieces of 4,096 tokens, batch 1):")
        out.append("")
        out.append("| kind | tokens read | tokens/s so far | peak RSS (MiB) |")
        out.append("|---|---|---|---|")
        for r in streams:
            for n, m in sorted(r["streaming"].items(), key=lambda kv: int(kv[0])):
                out.append(f"| {r['impl']} | {int(n):,} | {m['tokens_per_s']:,.0f} | {m['peak_rss_mb']:,.0f} |")
    return "\n".join(out)


def study_report(rows: list[dict]) -> str:
    """One row per (threads, dim, seq) group: tokens/s of each kind, and each memory kind / swa."""
    kinds, memory = KINDS, MEMORY_KINDS
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if "error" not in r:
            groups[(r["threads"], r["dim"], r["seq"])][r["impl"]] = r["tokens_per_s"]
    out = ["| threads | dim | seq | " + " | ".join(kinds) + " | " + " | ".join(f"{k} / swa" for k in memory) + " |"]
    out.append("|" + "---|" * (3 + len(kinds) + len(memory)))
    for key in sorted(groups):
        g = groups[key]
        ratios = [f"{g[k] / g['swa']:.2f}x" if k in g and "swa" in g else "-" for k in memory]
        out.append(
            "| "
            + " | ".join(map(str, key))
            + " | "
            + " | ".join(fmt(g.get(k)) for k in kinds)
            + " | "
            + " | ".join(ratios)
            + " |"
        )  # noqa: E501
    return "\n".join(out) + "\n\n" + study_flops_report(rows)


def study_flops_report(rows: list[dict]) -> str:
    """Per group: executed FLOPs per token of each kind over swa's (the ratio tokens/s would have
    at equal GFLOP/s, an upper bound set by arithmetic), and each kind's achieved GFLOP/s."""
    kinds, memory = KINDS, MEMORY_KINDS
    groups: dict[tuple, dict[str, tuple[float, float]]] = defaultdict(dict)
    for r in rows:
        if "error" not in r and r.get("gflop_per_s"):
            flop_per_token = r["gflop_per_s"] * 1e9 / r["tokens_per_s"]
            groups[(r["threads"], r["dim"], r["seq"])][r["impl"]] = (flop_per_token, r["gflop_per_s"])
    head = " | ".join(f"{k} GFLOP/s" for k in kinds) + " | " + " | ".join(f"bound {k} / swa" for k in memory)
    out = ["| threads | dim | seq | " + head + " |", "|" + "---|" * (3 + len(kinds) + len(memory))]
    for key in sorted(groups):
        g = groups[key]
        rate = [f"{g[k][1]:.1f}" if k in g else "-" for k in kinds]
        bound = [f"{g['swa'][0] / g[k][0]:.2f}x" if k in g and "swa" in g else "-" for k in memory]
        out.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(rate + bound) + " |")
    return "\n".join(out)


def split_report(rows: list[dict]) -> str:
    """Per group: swa's step, and each memory kind's step as its memory op + the rest (ms)."""
    groups: dict[tuple, dict[tuple[str, str], float]] = defaultdict(dict)
    for r in rows:
        if "error" not in r:
            ms = 1e3 * r["batch"] * r["seq"] / r["tokens_per_s"]
            groups[(r["threads"], r["dim"], r["seq"])][(r["impl"], r.get("memory_op", "on"))] = ms
    head = " | ".join(f"{k} step = op + rest (op share)" for k in MEMORY_KINDS)
    out = ["| threads | dim | seq | swa step | " + head + " |", "|" + "---|" * (4 + len(MEMORY_KINDS))]
    for key in sorted(groups):
        g, cells = groups[key], []
        for k in MEMORY_KINDS:
            on, off = g.get((k, "on")), g.get((k, "off"))
            if on is None or off is None:
                cells.append("-")
                continue
            cells.append(f"{on:.0f} = {on - off:.0f} + {off:.0f} ({(on - off) / on:.0%})")
        swa = g.get(("swa", "on"))
        out.append("| " + " | ".join(map(str, key)) + f" | {fmt(swa)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    what, path = sys.argv[1], sys.argv[2]
    reports = {"memory": memory_report, "models": models_report, "study": study_report, "split": split_report}
    print(reports[what](load(path)))
