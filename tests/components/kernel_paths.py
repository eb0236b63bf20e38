"""For tests that run both ways: the C++ kernel on CPU, or the torch code it replaces."""

import pytest

from components.ops.memory import cpu_loop


def kernel_or_torch(kind: str, monkeypatch, names: tuple[str, ...]) -> list[str]:
    """ "torch": the kernel reported absent (`cpu_loop.conv_kernel` says None); "cpp": the kernel
    (skipped where it is not built), each call of the named `cpu_loop` entry points recorded in
    the returned list, so the test can check that it was taken."""
    calls: list[str] = []
    if kind == "torch":
        monkeypatch.setattr(cpu_loop, "conv_kernel", lambda *t: None)
        return calls
    if isinstance(cpu_loop.library(), str):
        pytest.skip(f"the C++ kernel is not built here: {cpu_loop.library()}")
    for name in names:
        original = getattr(cpu_loop, name)
        monkeypatch.setattr(cpu_loop, name, lambda *a, f=original, n=name: calls.append(n) or f(*a))
    return calls
