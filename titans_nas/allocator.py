"""Keep the C allocator from returning every large block to the OS (glibc on Linux).

glibc serves blocks above its mmap threshold with a fresh mmap and gives them back on free, so a
long sequence, whose chunk loop allocates thousands of state-sized tensors, pays a page fault
for every page of every one of them. Measured (docs/benchmarks.md, the memory layer at 16K vs
1K tokens, 2 threads): per-token cost 1.6-1.9x of 1K's with the defaults, 1.02x with these
settings; at study sizes (256 tokens) no change. Freed memory then stays with the process for
reuse; peak RSS is unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 32) -> bool:
    """mallopt the thresholds once per process; True where it took effect (Linux glibc)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the thresholds are ints: 1 << 32 does not fit, so the trim threshold is capped at INT_MAX
    ok = mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 2**31 - 1)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, min(trim_threshold, 2**31 - 1)) == 1 and ok
    _done = ok
    return ok
