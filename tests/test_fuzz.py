"""A fuzz test of the spec language (issue 15): random YAML trees and random `--set` strings
against `titans-nas inspect` never end in a traceback: every input is either a model (exit 0)
or one line saying what is wrong (exit 2)."""

import contextlib
import io
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from titans_nas import load_spec
from titans_nas.cli import main


def _paths(data, prefix=""):
    for key, value in data.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _paths(value, f"{prefix}{key}.")


KINDS = ("lmm", "mag", "mac", "mal", "swa")
FIELDS = sorted({p for kind in KINDS for p in _paths(load_spec(f"{kind}-tiny").model_dump(mode="json"))})
KEYS = st.sampled_from([p.split(".")[-1] for p in FIELDS] + ["kind", "extends", "bogus"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 32, 64, 256, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["mag", "mac", "mal", "lmm", "swa", "attention", "linear", "mlp", "gelu", "", "${dim}", "x"]),
    st.text(max_size=8),
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)
SETS = st.builds(
    lambda path, value, raw: f"{path}={raw if raw is not None else json.dumps(value)}",
    st.sampled_from(FIELDS + ["bogus.x", "block", "", "a..b"]),
    TREES,
    st.one_of(st.none(), st.sampled_from(["", "[1,2", "{a: 1}", "&a [*a]", "1e9", "null", "=", "${oc.env:HOME}"])),
)


def run(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(KEYS, TREES, max_size=5), base=st.sampled_from(["lmm-tiny", "mag-tiny", "mac-tiny"]))
def test_random_spec_files_give_a_model_or_one_line(tree, base):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "spec.yaml"
        path.write_text(yaml.safe_dump({"extends": base, **tree}))
        code, err = run(["inspect", str(path), "--seq", "64"])
    assert code in (0, 2)
    assert code == 0 or (err.startswith("error: ") and len(err.strip().splitlines()) == 1), err


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(sets=st.lists(SETS, min_size=1, max_size=3))
def test_random_set_strings_give_a_model_or_one_line(sets):
    argv = ["inspect", "mag-tiny", "--seq", "64"]
    for item in sets:
        argv += ["--set", item]
    code, err = run(argv)
    assert code in (0, 2)
    assert code == 0 or (err.startswith("error: ") and len(err.strip().splitlines()) == 1), err
