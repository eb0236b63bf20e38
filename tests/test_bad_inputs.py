"""Bad input and hostile files (issue 15): each is refused with one line and exit code 2, no
traceback, quickly; nothing outside what the command owns is read, written or deleted."""

import time

import pytest

from titans_nas.cli import main

BOMB = "extends: lmm-tiny\n" + "\n".join(
    f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9 if prev else ['"lol"'] * 9) + "]"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def refused(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with one error line and no traceback. Returns the line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_yaml_bomb_is_refused_at_once(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)  # 9 levels of 9 aliases: 9^9 strings once expanded
    start = time.perf_counter()
    err = refused(capsys, ["inspect", str(bomb)])
    assert time.perf_counter() - start < 1.0
    assert str(bomb) in err and "aliases expand to more than" in err


@pytest.mark.parametrize(
    "value, reason",
    [
        ("&x [1, *x]", "recursive"),
        (
            "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b],"
            " &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]]",
            "aliases expand",
        ),
    ],
)
def test_a_bomb_or_a_loop_in_a_set_value_is_refused(value, reason, capsys):
    err = refused(capsys, ["inspect", "lmm-tiny", "--set", f"block.window={value}"])
    assert err.startswith("error: --set block.window=") and reason in err


def test_anchors_within_the_budget_still_work(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("extends: mag-tiny\nblock: {kind: mag, window: &w 16}\nvocab_size: *w\n")
    assert main(["inspect", str(spec)]) == 0
    assert "window: 16" in capsys.readouterr().out
