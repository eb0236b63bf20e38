"""What a study run owns outside its directory, and how it cleans up only that: the private Ray
temp dir it created (marked with an owner file naming the run dir) and the Ray processes it
started (PID and start time recorded in state.json while it runs).

A run dir can be copied, edited or handed over, so nothing in its state.json is trusted on its
own: a temp dir is deleted only if it has the shape this module gives such dirs and its owner
file names this very run dir; a process is killed only if its PID was recorded with the same
start time (PIDs are reused) and its command line names that verified temp dir. Linux /proc.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import uuid
from pathlib import Path

OWNER = "titans-nas-run"
"""The file in a run's Ray temp dir that names the run dir which created it."""
NAME = re.compile(r"tn-ray-[0-9a-f]{8}")


def new_temp_dir(run_dir: Path) -> str:
    """A fresh private Ray temp dir for `run_dir`, with its owner file (short: Ray's socket
    paths must stay under 107 bytes)."""
    path = Path(tempfile.gettempdir()) / f"tn-ray-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    (path / OWNER).write_text(str(run_dir))
    return str(path)


def owned_temp_dir(run_dir: Path, named: object) -> Path | None:
    """`named` (state.json's `ray_temp_dir`) if it is a temp dir this run created, else None."""
    if not isinstance(named, str):
        return None
    path = Path(named)
    if path.parent != Path(tempfile.gettempdir()) or not NAME.fullmatch(path.name):
        return None
    owner = path / OWNER
    if path.is_symlink() or not path.is_dir() or owner.is_symlink() or not owner.is_file():
        return None
    return path if owner.read_text() == str(run_dir) else None


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live process below `root` in the process tree: pid -> start time."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        got = _stat(int(proc.name))
        if got is not None:
            children.setdefault(got[0], []).append(int(proc.name))
            starts[int(proc.name)] = got[1]
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in starts and pid not in out:
            out[pid] = starts[pid]
            todo += children.get(pid, [])
    return out


def stop(recorded: object, temp_dir: Path | str | None) -> int:
    """SIGKILL the recorded processes ([[pid, start time], ...]) that are still those very
    processes and whose command line names `temp_dir`; returns how many."""
    if temp_dir is None or not isinstance(recorded, list):
        return 0
    mention, killed = str(temp_dir).encode(), 0
    for entry in recorded:
        if not (isinstance(entry, list | tuple) and len(entry) == 2 and all(isinstance(x, int) for x in entry)):
            continue
        pid, start = entry
        if pid in (os.getpid(), 0, 1) or _stat(pid) is None or _stat(pid)[1] != start:
            continue
        try:
            if mention not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed
