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


TINY = ["--set", "dim=16", "--set", "heads=2", "--set", "depth=1", "--task-set", "length=4", "--batch-size", "2"]


@pytest.mark.parametrize(
    "argv, where, reason",
    [
        (["train", "lmm-tiny", "--steps", "0"], "--steps", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--steps", "-5"], "--steps", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--batch-size", "0"], "--batch-size", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--lr", "-1"], "--lr", "greater than 0"),
        (["train", "lmm-tiny", "--checkpoint-every", "0"], "--checkpoint-every", "greater than or equal to 1"),
        (["train", "lmm-tiny", "--device", "bogus"], "--device", "not a torch device"),
        (["train", "lmm-tiny", "--out", "/proc/version"], "--out", "is a file"),
        (["train", "lmm-tiny", "--out", "/proc/titans-nas"], "--out", "cannot write"),
        (["train", "lmm-tiny", "--out", "/tmp/titans-nas-none", "--resume"], "--out", "no run to resume"),
        (["inspect", "lmm-tiny", "--set", "block=[1,2]"], "--set block=[1,2]", "block: list cannot replace a mapping"),
        (["inspect", "lmm-tiny", "--seq", "0"], "--seq", "at least 1"),
        (["inspect", "lmm-tiny", "--set", "depth=1e9"], "--set depth=1e9", "less than or equal to 4096"),
        (
            ["inspect", "lmm-tiny", "--set", "vocab_size=1180591620717411303424"],
            "--set vocab_size=1180591620717411303424",
            "less than",
        ),
        (
            ["inspect", "lmm-tiny", "--set", "block.memory.chunk_size=1e12"],
            "--set block.memory.chunk_size=1e12",
            "less",
        ),
        (
            ["inspect", "lmm-tiny", "--set", "dim=65536", "--set", "depth=4096"],
            "--set dim=65536",
            "over 2.1e+14 parameters",
        ),
        (["niah", "/nonexistent", "--lengths", "100"], "--lengths 100", "cannot hold the needle"),
        (["niah", "/nonexistent", "--lengths", "10"], "--lengths 10", "greater than or equal to 64"),
        (["niah", "/nonexistent", "--lengths", "abc"], "--lengths", "comma-separated whole numbers"),
        (["niah", "/nonexistent", "--depths", "5"], "--depths", "in [0, 1]"),
        (["niah", "/nonexistent", "--samples", "0"], "--samples", "at least 1"),
    ],
)
def test_bad_flags_name_the_flag(argv, where, reason, capsys):
    err = refused(capsys, argv)
    assert err.startswith(f"error: {where}: ") and reason in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_this_machine_lacks_is_refused(capsys):
    assert "sees no CUDA device" in refused(capsys, ["train", "lmm-tiny", "--device", "cuda"])


def test_a_spec_file_that_is_not_utf8_is_refused(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(b"extends: lmm-tiny\ndim: \xff\xfe\n")
    assert f"error: {spec}: not UTF-8 text" in refused(capsys, ["inspect", str(spec)])


def test_an_earlier_run_is_neither_replaced_nor_continued_unless_asked(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "lmm-tiny", *TINY, "--steps", "2", "--eval-every", "2", "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    err = refused(capsys, ["train", "lmm-tiny", *TINY, "--steps", "2", "--out", str(out)])
    assert "already holds a run: --resume continues it, --overwrite replaces it" in err
    assert (out / "metrics.jsonl").read_text() == before
    assert "not both" in refused(capsys, ["train", "lmm-tiny", "--out", str(out), "--resume", "--overwrite"])
    again = ["train", "lmm-tiny", *TINY, "--steps", "3", "--eval-every", "3", "--out", str(out), "--overwrite"]
    assert main(again) == 0
    lines = (out / "metrics.jsonl").read_text()
    assert '"step": 3' in lines and '"step": 2,' not in lines


def test_a_huge_size_in_a_file_is_refused_at_once(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("extends: lmm-tiny\ndim: 4.0e+29\n")
    start = time.perf_counter()
    err = refused(capsys, ["inspect", str(spec)])
    assert time.perf_counter() - start < 1.0 and f"{spec}: dim:" in err
