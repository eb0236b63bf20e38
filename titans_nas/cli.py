"""`titans-nas`: define, inspect, train, evaluate and export Titans-style models, and run
architecture studies (Ray Tune + Optuna). Bad input prints one line and exits with code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from titans_nas.allocator import keep_freed_memory
from titans_nas.config import SpecError, dump_spec, load_spec, load_union, validate
from titans_nas.spec import ModelSpec

console = Console(highlight=False)


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(ModelSpec.model_json_schema(), indent=2))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from titans_nas.builder import build_model
    from titans_nas.summary import flops_per_token, param_rows

    _at_least("--seq", args.seq, 1)
    spec = load_spec(args.spec, args.set)
    print(dump_spec(spec), end="")
    import torch

    with torch.device("meta"):
        model = build_model(spec)
    table = Table(title="parameters", show_edge=False)
    table.add_column("component")
    table.add_column("params", justify="right")
    total = 0
    for name, count, level in param_rows(model):
        table.add_row(("  " * level) + name, f"{count:,}")
        total += count if level == 0 else 0
    table.add_row("total", f"{total:,}", style="bold")
    console.print(table)
    fpt = flops_per_token(spec, args.seq)
    console.print(
        f"forward FLOPs per token at seq {args.seq}: {fpt / 1e6:,.2f} M (training step ~3x: {3 * fpt / 1e6:,.2f} M)"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    from titans_nas.tasks import TaskSpec
    from titans_nas.train import TrainSpec, check_compatible, health_lines, train

    spec = load_spec(args.spec, args.set)
    task = load_union(args.task, TaskSpec, args.task_set, flag="--task-set", what="task")
    flags = {
        "--steps": ("steps", args.steps),
        "--batch-size": ("batch_size", args.batch_size),
        "--lr": ("lr", args.lr),
        "--seed": ("seed", args.seed),
        "--eval-every": ("eval_every", args.eval_every),
        "--checkpoint-every": ("checkpoint_every", args.checkpoint_every),
        "--compile": ("compile", args.compile or None),
    }
    given = {name: value for name, value in flags.values() if value is not None}
    cfg = validate(given, TrainSpec, {"": "command line", **{name: flag for flag, (name, _) in flags.items()}})
    device = _device(args.device)
    check_compatible(spec, task)  # before --out is made or an earlier run there replaced
    out = _run_dir(args.out, resume=args.resume, overwrite=args.overwrite) if args.out else None
    console.print(
        f"training {args.spec} ({spec.block.kind}) on {task.kind} for {cfg.steps} steps" + (f" -> {out}" if out else "")
    )
    progress = _progress(cfg.steps)

    def on_log(rec: dict) -> None:
        if progress is not None and rec["split"] == "train" and "lr" in rec:
            progress.update(0, completed=rec["step"], description=f"loss {rec['loss']:.4f}")

    def on_eval(rec: dict, _ckpt: object) -> None:
        skip = ("step", "split", "params", "tokens_per_s", "peak_mem_mb", "grad_norm", "grad_norm_max")
        metric = "  ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in skip and not k.startswith("block."))
        console.print(
            f"step {rec['step']:>6}  eval {metric}  {rec['tokens_per_s']:,.0f} tok/s  "
            f"grad norm {rec['grad_norm']:.2f} (max {rec['grad_norm_max']:.2f}, pre-clip)",
            soft_wrap=True,
        )
        for line in health_lines(rec):
            console.print(f"{'':13}{line}", soft_wrap=True)

    with progress if progress is not None else _nothing():
        result = train(spec, task, cfg, out, resume=args.resume, on_log=on_log, on_eval=on_eval, device=device)
    if result.status == "diverged":
        print(f"diverged: {result.message}", file=sys.stderr)
        return 3
    if result.message.startswith("interrupted"):  # SIGINT / SIGTERM: checkpointed, resumable
        print(f"{result.message}: checkpoint written; continue with --resume", file=sys.stderr)
        return 130
    console.print(
        f"{result.status} at step {result.step}: params {int(result.metrics['params']):,}, "
        f"peak memory {result.metrics['peak_mem_mb']:,.0f} MiB"
    )
    return 0


def _numbers(flag: str, text: str, kind: type) -> list:
    """A comma-separated list of numbers from a flag (exit 2 naming the flag otherwise)."""
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        word = "whole numbers" if kind is int else "numbers"
        raise SpecError(flag, "", f"expected comma-separated {word}, got '{text}'") from None
    return values


def _at_least(flag: str, value: int, least: int) -> None:
    if value < least:
        raise SpecError(flag, "", f"must be at least {least}, got {value}")


def _device(name: str) -> str:
    """--device: a torch device this machine has (exit 2 otherwise, not a traceback mid-build)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpecError("--device", "", f"'{name}' is not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device", "", f"'{name}': this machine's torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SpecError("--device", "", f"'{name}': only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SpecError("--device", "", f"'{name}': this machine's torch has no MPS device")
    if device.type not in ("cpu", "cuda", "mps"):
        raise SpecError("--device", "", f"'{name}': training runs on cpu, cuda or mps")
    return name


def _run_dir(path: str, *, resume: bool, overwrite: bool) -> Path:
    """--out: a directory this command may write. An earlier run there is continued only with
    --resume and replaced only with --overwrite; a file or an unwritable place is refused."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SpecError("--out", "", f"{out} is a file, not a run directory")
    holds_run = (out / "metrics.jsonl").is_file() or (out / "checkpoint").is_dir()
    if resume and overwrite:
        raise SpecError("--out", "", "give --resume (continue the run) or --overwrite (replace it), not both")
    if resume and not holds_run:
        raise SpecError("--out", "", f"{out} holds no run to resume (no metrics.jsonl or checkpoint/)")
    if holds_run and not resume and not overwrite:
        raise SpecError("--out", "", f"{out} already holds a run: --resume continues it, --overwrite replaces it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise SpecError("--out", "", f"cannot write to {out}: {e.strerror}") from None
    if holds_run and overwrite:  # exactly what `train` writes, nothing else in the directory
        import shutil

        from titans_nas.train import RUN_FILES

        for name in RUN_FILES:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return out


def _progress(total: int):
    """A progress bar on a terminal; None (quiet) when output is not a TTY."""
    if not sys.stdout.isatty():
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    progress.add_task("starting", total=total)
    return progress


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _eval(args: argparse.Namespace) -> int:
    from titans_nas.evaluate import evaluate_task, load_run
    from titans_nas.tasks import TaskSpec

    spec, model = load_run(args.run)
    run = Path(args.run)
    recorded = _recorded_eval(run)  # the run's own evaluation set, unless told otherwise
    task_ref = args.task or (str(run / "task.yaml") if (run / "task.yaml").is_file() else None)
    if task_ref is None:
        raise SpecError(str(run), "", "no task.yaml here: give --task")
    task = load_union(task_ref, TaskSpec, args.task_set, flag="--task-set", what="task")
    batches = args.batches or recorded.get("batches", 8)
    batch_size = args.batch_size or recorded.get("batch_size", 16)
    seed = args.eval_seed if args.eval_seed is not None else recorded.get("seed")
    metrics = evaluate_task(model, spec, task, batches=batches, batch_size=batch_size, seed=seed)
    print(json.dumps({"run": str(args.run), "task": task.model_dump(mode="json"), **metrics}, indent=2))
    return 0


def _recorded_eval(run: Path) -> dict:
    """The evaluation set an export (metrics.json) or a training run (train.yaml) was scored on."""
    if (run / "metrics.json").is_file():
        return json.loads((run / "metrics.json").read_text()).get("eval", {})
    if (run / "train.yaml").is_file():
        import yaml

        from titans_nas.train import eval_set

        return eval_set(yaml.safe_load((run / "train.yaml").read_text()))
    return {}


def _niah(args: argparse.Namespace) -> int:
    from titans_nas.evaluate import load_run, niah_grid
    from titans_nas.tasks import NIAHSpec
    from titans_nas.train import check_compatible

    lengths = _numbers("--lengths", args.lengths, int)
    depths = _numbers("--depths", args.depths, float)
    _at_least("--samples", args.samples, 1)
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise SpecError("--depths", "", f"depths are fractions of the haystack in [0, 1], got {args.depths}")
    task = validate({"variant": args.variant, "digits": args.digits}, NIAHSpec, {"": "--digits"})
    for n in lengths:  # every cell's context must hold the needle and the question
        validate({**task.model_dump(), "context_len": n}, NIAHSpec, {"": f"--lengths {n}"})
    spec, model = load_run(args.run)
    check_compatible(spec, task)
    grid = niah_grid(model, task, lengths, depths, samples=args.samples, seed=args.seed)
    out = Path(args.out or Path(args.run) / "niah")
    out.mkdir(parents=True, exist_ok=True)
    title = f"S-NIAH {args.variant}: {Path(args.run).name} ({spec.block.kind})"
    (out / f"niah-{args.variant}.md").write_text(grid.markdown(title))
    grid.heatmap(out / f"niah-{args.variant}.png", title)
    print(grid.markdown(title))
    console.print(f"wrote {out / f'niah-{args.variant}.md'} and .png")
    return 0


def _study(args: argparse.Namespace) -> int:
    from titans_nas.search import engine
    from titans_nas.search.report import load_trials, report, status_counts, trials_table
    from titans_nas.search.study import load_study

    if args.set and args.action != "run":  # a run's study is fixed once it started
        raise SpecError("--set", "", f"`study {args.action}` takes no --set: the run keeps the study it started with")
    if args.action == "dashboard":
        from titans_nas.search.dashboard import serve

        console.print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Ctrl-C stops it)")
        serve(args.target, args.host, args.port)
        return 0
    target = args.target
    if args.action == "run":
        target = args.out or Path("runs") / load_study(args.target, args.set).spec.name
    try:
        if args.action == "run":
            run_dir = engine.run(args.target, target, tuple(args.set))
        elif args.action == "resume":
            run_dir = engine.resume(args.target)
    except KeyboardInterrupt:
        print(
            f"interrupted: finished trials are kept; continue with `titans-nas study resume {target}`", file=sys.stderr
        )
        return 130
    if args.action not in ("run", "resume"):
        run_dir = Path(args.target)
        engine.read_state(run_dir)
    study = load_study(run_dir / "study.yaml")
    records = load_trials(run_dir)
    metrics = list(dict.fromkeys([o.metric for o in study.spec.objectives] + ["loss"]))
    if args.action == "status":
        state = engine.read_state(run_dir)
        counts = ", ".join(f"{n} {s}" for s, n in sorted(status_counts(records).items())) or "no trial started"
        how = "finished" if state["finished"] else "interrupted" if state.get("interrupted") else "not finished"
        console.print(f"study {study.spec.name}: {how}; {counts}")
    print(trials_table(records, metrics))
    if args.action != "status":
        console.print(f"report: {report(run_dir)}")
    failed = [r for r in records if r.status == "failed"]
    return 4 if records and len(failed) == len(records) else 0


def _export(args: argparse.Namespace) -> int:
    from titans_nas.export import export, load_export

    out = export(args.run, args.out, rank=args.rank, trial=args.trial, objective=args.objective)
    spec, model, metrics = load_export(out)  # what a user will load: checked right away
    final = ", ".join(f"{k} {v:.4g}" for k, v in metrics["final_eval"].items() if isinstance(v, float))
    study = metrics["study"]
    origin = f"trial {study['trial_id']} of {study['study']}" if study else str(args.run)
    params = sum(p.numel() for p in model.parameters())
    console.print(f"exported {origin} -> {out} ({spec.block.kind}, {params:,} params; {final})")
    return 0


EXIT_CODES = """exit codes:
  0    done
  2    bad input: a spec, flag, file or run directory (one line: where, dotted path, reason)
  3    training diverged (non-finite loss or gradient)
  4    study: every trial failed
  130  interrupted (Ctrl-C / SIGTERM): checkpointed, continue with --resume / study resume
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="titans-nas",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("schema", help="print the JSON schema of a model spec")
    s.set_defaults(fn=_schema)

    s = sub.add_parser("inspect", help="resolved spec, parameters per component, FLOPs per token")
    s.add_argument("spec", help="preset name or YAML path")
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a spec field")
    s.add_argument("--seq", type=int, default=2048, help="sequence length for the FLOP count (default 2048)")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("train", help="train a spec on a generated task")
    s.add_argument("spec", help="preset name or YAML path")
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a spec field")
    s.add_argument("--task", default="copy", help="task kind (its defaults) or a task YAML path (default copy)")
    s.add_argument("--task-set", action="append", default=[], metavar="A=B", help="override a task field")
    s.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    s.add_argument("--batch-size", type=int, help="sequences per step (default 16)")
    s.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    s.add_argument("--seed", type=int, help="seed of the training data stream (default 0)")
    s.add_argument("--eval-every", type=int, help="evaluate every N steps and at the end (default 100)")
    s.add_argument(
        "--checkpoint-every", type=int, help="checkpoint every N steps (default: every evaluation; always at the end)"
    )
    s.add_argument("--out", help="run directory (metrics.jsonl, checkpoint, result.json)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    s.add_argument("--device", default="cpu", help="torch device to train on (default cpu)")
    s.add_argument("--compile", action="store_true", help="torch.compile the memory's chunk step")
    s.set_defaults(fn=_train)

    s = sub.add_parser("eval", help="a trained run's metric on a task's eval set")
    s.add_argument("run", help="training run or export directory")
    s.add_argument("--task", help="task kind (its defaults) or a task YAML path (default: the run's task.yaml)")
    s.add_argument("--task-set", action="append", default=[], metavar="A=B", help="override a task field")
    s.add_argument("--batches", type=int, help="evaluation batches (default: the run's own evaluation set)")
    s.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's own evaluation set)")
    s.add_argument("--eval-seed", type=int, help="seed of the evaluation set (default: the run's own)")
    s.set_defaults(fn=_eval)

    s = sub.add_parser("niah", help="needle-in-a-haystack grid: context length x depth (table + heatmap)")
    s.add_argument("run", help="training run directory (spec.yaml + checkpoint/)")
    s.add_argument(
        "--variant", default="passkey", choices=["passkey", "number", "uuid"], help="S-NIAH-1/2/3 (default passkey)"
    )
    s.add_argument("--lengths", default="256,512,1024,2048,4096", help="context lengths in bytes (default 256..4096)")
    s.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (default 0,0.25,...,1)")
    s.add_argument("--digits", type=int, default=7, help="digits of the passkey / number (default 7)")
    s.add_argument("--samples", type=int, default=20, help="examples per cell (default 20)")
    s.add_argument("--seed", type=int, default=0, help="seed of the examples (default 0)")
    s.add_argument("--out", help="directory for niah-<variant>.md and .png (default RUN/niah)")
    s.set_defaults(fn=_niah)

    s = sub.add_parser("export", help="write a trained configuration as a model directory (spec + safetensors)")
    s.add_argument("run", help="a study run directory or a training run directory")
    s.add_argument("--out", required=True, help="export directory (new or empty)")
    s.add_argument("--rank", type=int, default=1, help="the rank-th best completed trial (default: the best)")
    s.add_argument("--trial", help="a trial id instead of a rank")
    s.add_argument("--objective", help="rank on this objective (several objectives: among the Pareto front)")
    s.set_defaults(fn=_export)

    s = sub.add_parser("study", help="run, resume, watch or report a study (Ray Tune + Optuna)")
    s.add_argument("action", choices=["run", "resume", "status", "report", "dashboard"])
    s.add_argument("target", help="run: a study YAML; resume/status/report/dashboard: a run directory")
    s.add_argument("--host", default="127.0.0.1", help="dashboard: address to serve on (default localhost only)")
    s.add_argument("--port", type=int, default=8080, help="dashboard: port (default 8080)")
    s.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a study field (run only)")
    s.add_argument("--out", help="run directory (run; default runs/<study name>)")
    s.set_defaults(fn=_study)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()  # allocator.py: long sequences otherwise page-fault on every state tensor
    try:
        return args.fn(args)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
