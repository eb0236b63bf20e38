"""Shared benchmark driver: side-by-side timing in one process, peak RSS in a fresh one.

A benchmark script defines `DEFAULTS`, `suite(quick) -> list of groups` and
`make_step(cfg) -> (step, module)`, and calls `main(...)`. The implementations of one group are
timed in one process, interleaved round-robin, so all see the same machine conditions (this
machine is shared and noisy: compare the ratios inside a group, not numbers across runs). Peak
RSS is measured for each configuration alone in a fresh process. One JSON line per configuration.

A configuration with `"flush_denormals": true` runs its steps under torch.set_flush_denormal(True)
(the calling thread's float mode): what the C++ memory kernel does inside its loops, offered to
the code it is compared with (titans-pytorch, our torch path), so a ratio can say how much of it
is denormals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

StepFactory = Callable[[dict], tuple[Callable[[], Any], Any]]


def time_group(group: list[dict], make_step: StepFactory, rounds: int) -> list[dict]:
    import torch

    from titans_nas.allocator import keep_freed_memory
    from titans_nas.flops import flop_counter

    keep_freed_memory()  # as train() does
    torch.set_num_threads(group[0]["threads"])
    steps, first, times, flops = {}, {}, {}, {}
    flush = [bool(cfg.get("flush_denormals", False)) for cfg in group]
    for i, cfg in enumerate(group):
        steps[i], _ = make_step(cfg)
        torch.set_flush_denormal(flush[i])
        t0 = time.perf_counter()
        steps[i]()  # warm-up (and compilation, for compiled variants)
        first[i], times[i], flops[i] = time.perf_counter() - t0, [], None
        if cfg.get("count_flops", True):
            try:
                with flop_counter() as counter:
                    steps[i]()
                flops[i] = counter.get_total_flops()
            except Exception:  # noqa: BLE001 - a counter failure must not lose the timing
                pass
    for _ in range(rounds):
        for i in range(len(group)):
            torch.set_flush_denormal(flush[i])
            t = time.perf_counter()
            steps[i]()
            times[i].append(time.perf_counter() - t)
    torch.set_flush_denormal(False)
    out = []
    for i, cfg in enumerate(group):
        tokens = cfg["batch"] * cfg["seq"]
        best, median = min(times[i]), sorted(times[i])[len(times[i]) // 2]
        out.append(
            {
                **cfg,
                "tokens_per_s": tokens / best,
                "tokens_per_s_median": tokens / median,
                "rounds": rounds,
                "first_call_s": first[i],
                "gflop_per_s": flops[i] / best / 1e9 if flops[i] else None,
            }
        )
    return out


def peak_rss(cfg: dict, make_step: StepFactory) -> dict:
    """Peak RSS (MiB) of a warm-up step plus one step, alone in this process; base = after building."""
    import torch

    from titans_nas.allocator import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(cfg["threads"])
    step, _ = make_step(cfg)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step()
    step()
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base}


def _child(script: str, flag: str, payload: Any, threads: int) -> Any:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, script, flag, json.dumps(payload)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(line: dict, out: str | None) -> None:
    """One JSON line to stdout, and appended to `out` if given."""
    text = json.dumps(line)
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture: figures differ by vendor
    (denormals cost an Intel core far more than an AMD one, docs/benchmarks.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu_model()}


def main(
    doc: str,
    defaults: dict,
    suite: Callable[[bool], list[list[dict]]],
    make_step: StepFactory,
    extra: Callable[[dict], dict] | None = None,
) -> None:
    """CLI shared by the benchmark scripts. `extra(cfg)` runs a configuration that is not a
    timed step (e.g. streaming) in its own process and returns its JSON record."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", help="time a JSON list of configurations in this process (interleaved)")
    p.add_argument("--rss", help="peak RSS of one JSON configuration in this process")
    p.add_argument("--extra", help="run one special JSON configuration in this process")
    p.add_argument("--quick", action="store_true", help="a short suite")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args()
    script = sys.argv[0]
    if args.group:
        group = [{**defaults, **c} for c in json.loads(args.group)]
        print(json.dumps(time_group(group, make_step, max(c.get("rounds", args.rounds) for c in group))))
        return
    if args.rss:
        print(json.dumps(peak_rss({**defaults, **json.loads(args.rss)}, make_step)))
        return
    if args.extra:
        print(json.dumps(extra({**defaults, **json.loads(args.extra)})))
        return
    info = machine()
    for group in suite(args.quick):
        if group and group[0].get("extra"):
            results = [{**defaults, **c, **_child(script, "--extra", c, defaults["threads"])} for c in group]
        else:
            timed = _child(
                script, "--group", [{**c, "rounds": c.get("rounds", args.rounds)} for c in group], defaults["threads"]
            )
            results = timed if isinstance(timed, list) else [{**defaults, **c, **timed} for c in group]
            for res in results:
                if "error" not in res:
                    res.update(
                        _child(
                            script,
                            "--rss",
                            {k: res[k] for k in res if k in defaults or k == "impl"},
                            defaults["threads"],
                        )
                    )
        for res in results:
            emit({**res, **info}, args.out)
