"""Export a trained configuration as a self-contained model directory, and load one safely
(DESIGN §9). An export holds:

    spec.yaml          the fully resolved ModelSpec (no `extends`, every default written)
    model.safetensors  the trained weights (never a pickle)
    task.yaml          the task it was trained and evaluated on
    metrics.json       objectives and final evaluation, trial id, study, task, seed, steps, eval set
    README.md          a model card
    provenance.json    package / torch versions, git commit, sha256 of every other file

The source is a study run (the trial picked by rank on an objective, or by id) or a plain
training run directory. `load_model` checks the hashes and the file format before it builds the
spec and loads the weights strictly.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from titans_nas.builder import build_model
from titans_nas.config import SpecError, dump_spec, load_data, load_spec
from titans_nas.model import TitansLM
from titans_nas.spec import SCHEMA_VERSION, ModelSpec
from titans_nas.tasks import TaskSpec
from titans_nas.train import eval_set, read_metrics, saved_task

FILES = ("spec.yaml", "model.safetensors", "task.yaml", "metrics.json", "README.md", "provenance.json")


@dataclass
class Source:
    """One trained run: its directory (a training run or a study trial) and what it recorded."""

    dir: Path
    metrics: dict[str, Any]
    """The final evaluation record (loss, task metric, step) plus params / tokens_per_s / peak memory."""
    train: dict[str, Any]
    study: dict[str, Any] | None = None
    """study name, Optuna study name, trial id, objectives, params: when it came from a study."""


# ---------------------------------------------------------------------------------------------
# picking the source


def _run_source(run: Path, study: dict[str, Any] | None = None) -> Source:
    """A training run directory as `train()` leaves it (a study trial is one too)."""
    needed = ["spec.yaml", "task.yaml", "train.yaml", "metrics.jsonl", "checkpoint/model.safetensors"]
    missing = [f for f in needed if not (run / f).is_file()]
    if missing:
        raise SpecError(str(run), "", f"not a finished training run: missing {', '.join(missing)}")
    evals = read_metrics(run / "metrics.jsonl", "eval")
    if not evals:
        raise SpecError(str(run), "metrics.jsonl", "the run has no evaluation to export")
    result = json.loads((run / "result.json").read_text()) if (run / "result.json").is_file() else {}
    if result.get("status") == "diverged":
        raise SpecError(str(run), "result.json", "the run diverged: its weights are not a model")
    metrics = {k: v for k, v in evals[-1].items() if k != "split"}
    for key in ("params", "tokens_per_s", "peak_mem_mb"):
        if key in result.get("metrics", {}):
            metrics[key] = result["metrics"][key]
    return Source(run, metrics, yaml.safe_load((run / "train.yaml").read_text()), study)


def pick(run_dir: str | Path, rank: int = 1, trial: str | None = None, objective: str | None = None) -> Source:
    """The run to export. A study run: trial `trial`, or the `rank`-th best completed trial on
    `objective` (default: the study's first); with several objectives only trials on the Pareto
    front are ranked. A training run directory: itself."""
    from titans_nas.search.report import TrialRecord, load_trials, pareto
    from titans_nas.search.study import load_study

    run_dir = Path(run_dir)
    if not (run_dir / "state.json").is_file():
        if trial is not None or objective is not None:
            raise SpecError(str(run_dir), "", "--trial and --objective need a study run directory")
        return _run_source(run_dir)
    study = load_study(run_dir / "study.yaml")
    state = json.loads((run_dir / "state.json").read_text())
    objectives = study.spec.objectives
    every = load_trials(run_dir)
    records = [r for r in every if r.status == "completed" and r.dir is not None]
    if trial is not None:
        chosen = [r for r in every if r.trial_id == trial]
        if not chosen:
            raise SpecError(str(run_dir), "", f"no trial '{trial}' in this study")
        if chosen[0].status != "completed":
            raise SpecError(str(run_dir), "", f"trial '{trial}' did not complete ({chosen[0].status})")
        record = chosen[0]
    else:
        names = [o.metric for o in objectives]
        target = objective or names[0]
        if target not in names:
            raise SpecError(str(run_dir), "", f"'{target}' is not an objective of this study: {', '.join(names)}")
        mode = next(o.mode for o in objectives if o.metric == target)
        pairs = [(o.metric, o.mode) for o in objectives]
        pool: list[TrialRecord] = pareto(records, pairs) if len(objectives) > 1 else records
        pool = [r for r in pool if r.value(target) is not None]
        pool.sort(key=lambda r: r.value(target) if mode == "min" else -r.value(target))
        if not 1 <= rank <= len(pool):
            where = "on the Pareto front" if len(objectives) > 1 else "completed"
            raise SpecError(str(run_dir), "", f"rank {rank} asked, {len(pool)} trials {where}")
        record = pool[rank - 1]
    info = {
        "study": study.spec.name,
        "optuna_study": state["study_name"],
        "trial_id": record.trial_id,
        "objectives": [o.model_dump() for o in objectives],
        "point": record.point,
    }
    return _run_source(record.dir, info)


# ---------------------------------------------------------------------------------------------
# writing


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def export(run_dir: str | Path, out: str | Path, rank: int = 1, trial: str | None = None, objective: str | None = None):
    """Write the export directory of the picked run; returns its path."""
    source = pick(run_dir, rank, trial, objective)
    final = Path(out)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise SpecError(str(final), "", "the export path exists and is not a directory")
    if final.exists() and any(final.iterdir()):
        raise SpecError(str(final), "", "the export directory exists and is not empty")
    final.parent.mkdir(parents=True, exist_ok=True)
    # written next to its place and renamed into it when complete: a failed export leaves nothing
    out = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        _write_export(source, out)
        if final.exists():
            final.rmdir()
        out.rename(final)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final


def _write_export(source: Source, out: Path) -> None:
    import titans_nas

    spec = load_spec(source.dir / "spec.yaml")
    (out / "spec.yaml").write_text(dump_spec(spec))
    shutil.copyfile(source.dir / "checkpoint" / "model.safetensors", out / "model.safetensors")
    shutil.copyfile(source.dir / "task.yaml", out / "task.yaml")
    task = yaml.safe_load((source.dir / "task.yaml").read_text())
    train = source.train
    metrics = {
        "final_eval": source.metrics,
        "objectives": {
            o["metric"]: source.metrics.get(o["metric"]) for o in (source.study or {}).get("objectives", [])
        },
        "study": None if source.study is None else {k: v for k, v in source.study.items() if k != "objectives"},
        "task": task,
        "seed": train["seed"],
        "steps": source.metrics.get("step"),
        "eval": eval_set(train),
        "source": str(source.dir.absolute()),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_finite))
    params = sum(p.numel() for p in build_model(spec, saved_task(out)).parameters())
    (out / "README.md").write_text(model_card(spec, params, metrics))
    provenance = {
        "titans_nas": titans_nas.__version__,
        "schema_version": SCHEMA_VERSION,
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sha256": {name: sha256(out / name) for name in FILES if name != "provenance.json"},
    }
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else str(v)


def describe(spec: ModelSpec) -> str:
    """The architecture in words (the model card's first paragraph)."""
    b, words = spec.block, spec.block.describe()
    parts = [f"{spec.depth} blocks of {words}, width {spec.dim}, {spec.heads} heads, vocabulary {spec.vocab_size}."]
    memory = getattr(b, "memory", None)
    if memory is not None:
        model = memory.model.describe()
        on = lambda x: "on" if x is not None else "off"  # noqa: E731
        parts.append(
            f"Memory: {model}, chunk {memory.chunk_size}, momentum {on(memory.momentum)}, decay {on(memory.decay)},"
            f" convolution {on(memory.conv)}."
        )
    persistent = getattr(b, "persistent", None)
    if persistent is not None:
        parts.append(f"{persistent.num_tokens} persistent memory tokens.")
    return " ".join(parts)


def model_card(spec: ModelSpec, params: int, metrics: dict[str, Any]) -> str:
    final = metrics["final_eval"]
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in final.items() if isinstance(v, (int, float)) and k != "step")
    study = metrics["study"]
    origin = (
        f"trial `{study['trial_id']}` of study `{study['study']}` (Optuna study `{study['optuna_study']}`)"
        if study
        else "a training run"
    )
    return f"""# Titans model: {spec.block.kind}

{describe(spec)}

- Parameters: {params:,}
- Trained on: `{metrics["task"]["kind"]}` ({", ".join(f"{k}={v}" for k, v in metrics["task"].items() if k != "kind")})
  for {metrics["steps"]} steps, seed {metrics["seed"]}
- From: {origin}

## Final evaluation

Fixed evaluation set: seed {metrics["eval"]["seed"]}, {metrics["eval"]["batches"]} batches of
{metrics["eval"]["batch_size"]}.

| metric | value |
|---|---|
{rows}

## Load

```python
from titans_nas import load_model
model = load_model("path/to/this/directory")   # checks hashes, builds spec.yaml, loads strictly
logits, state = model(tokens)                   # tokens: (batch, seq) int64
```

Evaluate again: `titans-nas eval path/to/this/directory` (its task and evaluation set by default).
Retrain at a larger budget: `titans-nas train path/to/this/directory/spec.yaml --task
path/to/this/directory/task.yaml --steps N`.
"""


# ---------------------------------------------------------------------------------------------
# loading


def check_safetensors(path: Path) -> None:
    """Refuse anything that is not a safetensors file (a pickle renamed included) before any
    byte of it is interpreted: an 8-byte header length, then a JSON header."""
    with path.open("rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    ok = len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8
    if ok:
        try:
            with safe_open(str(path), framework="pt"):
                return
        except Exception:  # noqa: BLE001 - any parse failure means: not safetensors
            ok = False
    kind = (
        "a pickle" if head[:1] == b"\x80" else "a zip (torch.save) archive" if head[:2] == b"PK" else "not safetensors"
    )
    raise SpecError(str(path), "", f"refused: the file is {kind}; only safetensors weights are loaded")


def load_export(path: str | Path) -> tuple[ModelSpec, TitansLM, dict[str, Any]]:
    """(spec, model in eval mode, metrics.json) of an export directory, after checking it."""
    d = Path(path)
    if not d.is_dir():
        raise SpecError(str(d), "", "no such export directory")
    for name in FILES:  # an export is read from its own directory only
        if (d / name).is_symlink():
            raise SpecError(str(d / name), "", "is a symbolic link: an export's files must be its own")
    for name in FILES:
        if not (d / name).is_file():
            others = sorted(p.name for p in d.glob("*.pt")) + sorted(p.name for p in d.glob("*.bin"))
            hint = f" (found {', '.join(others)}: only safetensors weights are loaded)" if others else ""
            raise SpecError(str(d), name, f"missing from the export{hint}")
    try:
        provenance = json.loads((d / "provenance.json").read_text())
        hashes = provenance["sha256"]
        if not isinstance(hashes, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise SpecError(str(d / "provenance.json"), "", "unreadable provenance (no sha256 of the files)") from None
    version = provenance.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SpecError(
            str(d),
            "provenance.json",
            f"exported with spec schema {version}; this titans-nas reads schema <= {SCHEMA_VERSION}:"
            " upgrade titans-nas",
        )
    check_safetensors(d / "model.safetensors")
    for name in FILES:
        if name != "provenance.json" and sha256(d / name) != hashes.get(name):
            raise SpecError(str(d / name), "", "sha256 differs from provenance.json: the file changed after export")
    spec = load_data(d / "spec.yaml", ModelSpec)
    model = build_model(spec, load_data(d / "task.yaml", TaskSpec))
    try:
        model.load_state_dict(load_file(d / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise SpecError(str(d / "model.safetensors"), "", f"weights do not fit spec.yaml: {e}") from None
    metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else {}
    return spec, model.eval(), metrics


def load_model(path: str | Path) -> TitansLM:
    """The model of an export directory: hashes verified, built from its spec, loaded strictly."""
    return load_export(path)[1]


def is_export(path: str | Path) -> bool:
    return (Path(path) / "provenance.json").is_file()


__all__ = ["FILES", "export", "is_export", "load_export", "load_model", "pick"]
