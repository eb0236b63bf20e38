"""For tests that run both ways, the C++ kernel on CPU or the torch code it replaces, and check
which one ran."""

import pytest

from components.ops.memory import cpu_loop


def _cpp_missing() -> str:
    """Why the C++ kernel is not built here ("" where it is)."""
    lib = cpu_loop.library()
    return lib if isinstance(lib, str) else ""


needs_cpp = pytest.mark.skipif(bool(_cpp_missing()), reason=f"the C++ kernel is not built here: {_cpp_missing()}")


def record_calls(monkeypatch, owner, names: tuple[str, ...], calls: list[str] | None = None) -> list[str]:
    """Each call of owner's named functions appended (by name) to the returned list."""
    calls = [] if calls is None else calls
    for name in names:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, f=original, n=name: calls.append(n) or f(*a))
    return calls


def kernel_or_torch(kind: str, monkeypatch, names: tuple[str, ...]) -> list[str]:
    """ "torch": the kernel reported unavailable (`cpu_loop.unavailable`); "cpp": the kernel
    (skipped where it is not built), each call of the named `cpu_loop` entry points recorded in
    the returned list, so the test can check that it was taken."""
    if kind == "torch":
        monkeypatch.setattr(cpu_loop, "unavailable", lambda *t: "the torch path, for this test")
        return []
    if _cpp_missing():
        pytest.skip(f"the C++ kernel is not built here: {_cpp_missing()}")
    return record_calls(monkeypatch, cpu_loop, names)
