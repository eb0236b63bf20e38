"""The generated reference cannot drift: every spec field, study field and search-space key has
an entry with a meaning, and the committed page is exactly what the code generates."""

from pathlib import Path

from titans_nas.reference import KIND_DOC, class_section, classes, generate, roots
from titans_nas.search.space import LEAF_DOCS, LEAVES

PAGE = Path(__file__).parent.parent / "docs" / "reference.md"


def test_every_field_of_every_spec_has_a_documented_entry():
    seen: list = []
    for _, root, _ in roots():
        for cls in classes(root, seen):
            section = class_section(cls)
            for name, field in cls.model_fields.items():
                assert f"| `{name}` |" in section, f"{cls.__name__}.{name} has no reference entry"
                assert field.description or name == "kind", f"{cls.__name__}.{name} has no docstring"
    names = {cls.__name__ for cls in seen}
    assert {"ModelSpec", "NeuralMemorySpec", "MACSpec", "NIAHSpec", "TrainSpec", "SearchStudySpec"} <= names
    assert KIND_DOC


def test_every_search_space_key_is_documented():
    assert set(LEAVES) | {"log", "step", "variants"} <= set(LEAF_DOCS)


def test_committed_reference_is_the_generated_one():
    assert PAGE.read_text() == generate(), "docs/reference.md is stale: run `make docs`"
