"""bench/harness.py: what a timed group does besides timing."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def flushes() -> bool:
    """Whether this thread's float arithmetic flushes denormals (torch.set_flush_denormal)."""
    return bool((torch.full((1,), 1e-39) * torch.ones(1) == 0).item())


def test_a_group_runs_each_configuration_in_its_own_denormal_mode_and_restores_it():
    import harness

    seen: dict[str, list[bool]] = {"plain": [], "flushed": []}

    def make_step(cfg):
        return (lambda: seen[cfg["impl"]].append(flushes())), None

    group = [{"impl": "plain", "batch": 1, "seq": 1, "threads": torch.get_num_threads()}]
    group.append({**group[0], "impl": "flushed", "flush_denormals": True})
    out = harness.time_group(group, make_step, rounds=3)
    assert seen["plain"] and not any(seen["plain"])  # warm-up, counted call, 3 rounds: interleaved
    assert len(seen["flushed"]) == len(seen["plain"]) and all(seen["flushed"])
    assert not flushes()
    assert [r["impl"] for r in out] == ["plain", "flushed"]
