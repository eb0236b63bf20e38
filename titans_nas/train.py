"""One training function for the CLI and for every study trial (DESIGN §7).

AdamW, linear warmup + cosine decay, gradient clipping, bf16 autocast on GPU, optional
torch.compile, periodic evaluation on a fixed seeded eval set, metrics as JSON lines, checkpoints
with exact resume (model, optimizer, data RNG), and a non-finite loss ends the run with status
`diverged` instead of a crash. Deterministic on CPU for a given spec and seed.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

from components.base import Spec, SpecRuleError
from components.neural_memory import NeuralMemory, compile_memory, recording, summarize_health
from titans_nas.allocator import keep_freed_memory
from titans_nas.builder import build_model
from titans_nas.config import SpecError, dump_spec, load_data
from titans_nas.model import TitansLM
from titans_nas.spec import ModelSpec
from titans_nas.tasks import IGNORE, TaskBase, TaskSpec

Status = Literal["completed", "diverged", "stopped"]


class CurriculumSpec(Spec):
    """Train the first `steps` steps on the trial's task with `task`'s fields changed (an easier
    form of it, e.g. S-NIAH-3's UUID needle learned after S-NIAH-2's number needle: docs/results.md
    §3b); then the task itself. Evaluations and metrics are always the task itself's."""

    steps: int = Field(ge=1)
    """Steps on the changed task, counted in `train.steps` (the schedule spans both phases)."""
    task: dict[str, Any] = Field(min_length=1)
    """Fields of the task to change during those steps: `{variant: number, digits: 5}`."""


class TrainSpec(Spec):
    """The training budget and optimiser."""

    steps: int = Field(500, ge=1)
    """Optimizer steps (the cosine schedule spans exactly these)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per step."""
    lr: float = Field(3e-3, gt=0.0)
    """Peak learning rate."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warmup from 0 to `lr`."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """The cosine decays to lr * min_lr_ratio at the last step."""
    weight_decay: float = Field(0.1, ge=0.0)
    """AdamW decoupled weight decay, on the weights of linear maps only (`decays`: not embeddings,
    norms, biases, conv filters, persistent tokens or the memory's initial weights)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this; null = no clipping."""
    eval_every: int = Field(100, ge=1)
    """Evaluate every this many steps (and always at the last step)."""
    eval_batches: int = Field(8, ge=1)
    """Batches in the fixed evaluation set."""
    eval_seed: int = Field(1_000_003, ge=0)
    """Seed of the evaluation set; keep it fixed to compare runs."""
    log_every: int = Field(10, ge=1)
    """Write a train-metrics line every this many steps."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every this many steps (and at the end, and when the run is
    stopped by SIGINT / SIGTERM); null = at every evaluation."""
    seed: int = Field(0, ge=0)
    """Seed of the training data stream."""
    compile: bool = False
    """Run the memory's chunk step and its hand-written backward through torch.compile (each
    step, not the chunk loop, so compile time does not grow with the sequence). On CPU 1.07-1.16x
    the eager memory op after ~26 s of compiling a new shape (docs/benchmarks.md); meant for GPU
    and long CPU runs."""
    curriculum: CurriculumSpec | None = None
    """First train on a changed form of the task; null = the task from the first step."""

    @model_validator(mode="after")
    def _curriculum_fits(self) -> TrainSpec:
        if self.curriculum is not None and self.curriculum.steps >= self.steps:
            raise SpecRuleError(
                "curriculum.steps", f"{self.curriculum.steps} leaves none of the {self.steps} steps for the task itself"
            )
        return self


@dataclass
class RunResult:
    status: Status
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    """The last evaluation (loss, task metric) plus params, tokens_per_s, peak_mem_mb."""
    message: str = ""


def lr_at(step: int, cfg: TrainSpec) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(module: torch.nn.Module, name: str) -> bool:
    """Whether AdamW's weight decay applies to `module`'s own parameter `name`: only to the weight
    matrices of linear maps (projections, gate projections, MLPs, the LM head). Everything else
    keeps its value unless the loss moves it: embeddings, norm gains, biases (gate biases set the
    gates' resting values), conv filters, persistent tokens and the memory's initial fast weights
    W_0 (decay would pull the memory's prior to zero)."""
    return isinstance(module, torch.nn.Linear) and name == "weight"


def decayed_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters `make_optimizer` decays."""
    return [
        f"{prefix}.{name}".lstrip(".")
        for prefix, module in model.named_modules()
        for name, _ in module.named_parameters(recurse=False)
        if decays(module, name)
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainSpec) -> torch.optim.AdamW:
    names = set(decayed_parameters(model))
    params = dict(model.named_parameters())  # tied parameters appear once
    decay = [p for n, p in params.items() if n in names]
    rest = [p for n, p in params.items() if n not in names]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # torch's fused AdamW where it has one (CPU, CUDA): the default loop over parameters costs
    # ~10 small ops each, 1.3-2.4 ms a step of the quickstart's models against 0.35-0.6 fused
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params.values())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def _block_grad_norms(model: TitansLM) -> dict[str, float]:
    """Pre-clip gradient norm of each block's parameters: `block.<i>.grad_norm`."""
    out = {}
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if grads:
            out[f"block.{i}.grad_norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    return out


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions with a target: logits (..., v), targets (...), in
    float32 at least (bf16 logits upcast, float64 kept)."""
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE)


def _memories(model: TitansLM) -> dict[int, NeuralMemory]:
    """The neural memory of each block that has one, by block index."""
    return {i: m for i, block in enumerate(model.blocks) for m in block.modules() if isinstance(m, NeuralMemory)}


@torch.no_grad()
def evaluate(
    model: TitansLM, task: TaskBase, cfg: TrainSpec, device: torch.device, health: bool = False
) -> dict[str, float]:
    """Loss and task metric on the fixed evaluation set (same batches for every run). health:
    also the memory health of every block on the first batch (`block.<i>.surprise`, ...:
    `summarize_health`)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    sums: dict[str, list[float]] = {"loss": [0.0, 0.0]}
    memories = _memories(model) if health else {}
    seen: dict[str, float] = {}
    for i in range(cfg.eval_batches):
        batch = task.sample(cfg.batch_size, gen, "eval")
        batch = batch.to(device)
        with _autocast(device), recording(list(memories.values()) if i == 0 else []) as records:
            logits, _ = model(batch.inputs)
        for b, log in zip(memories, records):
            seen |= {f"block.{b}.{k}": v for k, v in summarize_health(log).items()}
        n = float((batch.targets != IGNORE).sum())
        sums["loss"][0] += float(loss_fn(logits, batch.targets)) * n
        sums["loss"][1] += n
        for name, (num, den) in task.score(logits.float(), batch).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += num
            acc[1] += den
    model.train(was_training)
    return {k: num / max(den, 1e-12) for k, (num, den) in sums.items()} | seen


def _autocast(device: torch.device):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )


def saved_task(run_dir: Path) -> TaskBase | None:
    """The task a run (or its export) trained on, from its task.yaml; None where it has none.
    Models are rebuilt with it: a task's read-out head (MAD compression) is part of the weights."""
    return load_data(run_dir / "task.yaml", TaskSpec) if (run_dir / "task.yaml").is_file() else None


def curriculum_task(task: TaskBase, cfg: TrainSpec) -> TaskBase | None:
    """The task of the curriculum's first phase (validated; same kind and vocabulary as `task`,
    so the one model trains on both); None without a curriculum."""
    if cfg.curriculum is None:
        return None
    if "kind" in cfg.curriculum.task:
        raise SpecRuleError("curriculum.task.kind", "a curriculum changes fields of the task, not its kind")
    try:
        first = type(task).model_validate({**task.model_dump(), **cfg.curriculum.task})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise SpecRuleError(f"curriculum.task.{where}".rstrip("."), err["msg"]) from None
    if first.vocab_size != task.vocab_size:
        raise SpecRuleError("curriculum.task", f"changes the vocabulary ({task.vocab_size} -> {first.vocab_size})")
    return first


def check_compatible(model_spec: ModelSpec, task: TaskBase) -> None:
    if model_spec.vocab_size < task.vocab_size:
        fix = f"--set vocab_size={task.vocab_size}"
        if "vocab" in type(task).model_fields:  # the synthetic tasks' own vocabulary size
            fix = f"--task-set vocab={model_spec.vocab_size} or {fix}"
        raise SpecError(
            "task",
            "vocab_size",
            f"the task uses {task.vocab_size} token ids but the model's vocab_size is {model_spec.vocab_size}"
            f" (fix: {fix})",
        )


def train(
    model_spec: ModelSpec,
    task: TaskBase,
    cfg: TrainSpec,
    out_dir: Path | None = None,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_eval: Callable[[dict[str, Any], Path | None], bool | None] | None = None,
    device: str | torch.device = "cpu",
) -> RunResult:
    """Train `model_spec` on `task` for `cfg.steps` steps.

    out_dir: receives `spec.yaml`, `task.yaml`, `train.yaml`, `metrics.jsonl`, `checkpoint/`
    and `result.json`. resume: continue from `out_dir/checkpoint` exactly. stop_after: end this
    session after that many total steps (status `stopped`; resume continues it). on_log gets every
    metrics record; on_eval gets each evaluation and the checkpoint dir written with it (if any),
    and may return True to stop the run (status `stopped`).
    """
    check_compatible(model_spec, task)
    try:
        first = curriculum_task(task, cfg)
    except SpecRuleError as e:
        raise SpecError("train", e.path, e.reason) from None
    keep_freed_memory()  # long sequences allocate thousands of state-sized tensors (allocator.py)
    device = torch.device(device)
    model = build_model(model_spec, task).to(device)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt_dir = out_dir / "checkpoint" if out_dir is not None else None
    step, last_eval, grad_norms = 0, {}, []
    if out_dir is not None:
        step, last_eval, grad_norms = _open_run_dir(out_dir, (model_spec, task, cfg), resume, model, opt, gen)
    checkpoint_every = cfg.checkpoint_every or cfg.eval_every
    params = sum(p.numel() for p in model.parameters())
    if cfg.compile:
        compile_memory(model)

    def record(rec: dict[str, Any]) -> None:
        if out_dir is not None:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if on_log is not None:
            on_log(rec)

    def checkpoint() -> Path | None:
        return save_checkpoint(ckpt_dir, model, opt, gen, step, last_eval, grad_norms) if ckpt_dir else None

    throughput = Throughput()
    model.train()
    status: Status = "completed"
    message = ""
    signalled = SignalStop() if out_dir is not None else None
    while step < cfg.steps:
        if stop_after is not None and step >= stop_after:
            status = "stopped"
            break
        if signalled is not None and signalled.name:
            status, message = "stopped", f"interrupted by {signalled.name} at step {step}"
            break
        batch = (first if first is not None and step < cfg.curriculum.steps else task).sample(cfg.batch_size, gen)
        logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        loss, gnorm, block_norms = train_step(model, opt, batch, lr_at(step, cfg), cfg.grad_clip, logging)
        message = nonfinite(loss, "training loss", step + 1) or nonfinite(gnorm, "gradient norm", step + 1)
        if message:  # nothing was applied
            status = "diverged"
            record({"step": step + 1, "split": "train", "loss": loss, "status": "diverged"})
            break
        step += 1
        throughput.add(batch.inputs.numel())
        grad_norms.append(gnorm)
        if logging:
            record(
                {"step": step, "split": "train", "loss": loss, "lr": opt.param_groups[0]["lr"], "grad_norm": gnorm}
                | block_norms
                | {"tokens_per_s": throughput.lap()}
            )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec, last_eval = evaluation_record(model, task, cfg, device, step, grad_norms, params, throughput.last)
            record(rec)
            grad_norms = []
            message = nonfinite(last_eval["loss"], "evaluation loss", step)
            written = checkpoint() if step == cfg.steps or step % checkpoint_every == 0 else None
            if message:
                status = "diverged"
                break
            if on_eval is not None and on_eval(rec, written):
                status = "stopped"
                break
        elif step % checkpoint_every == 0:
            checkpoint()
    if signalled is not None:
        signalled.restore()
    if status == "stopped":
        checkpoint()
    metrics = {
        **last_eval,
        "params": float(params),
        "tokens_per_s": throughput.last,
        "peak_mem_mb": peak_mem_mb(device),
    }
    result = RunResult(status, step, metrics, message)
    if out_dir is not None:
        (out_dir / "result.json").write_text(
            json.dumps({"status": status, "step": step, "metrics": metrics, "message": message}, indent=2)
        )
    return result


def _open_run_dir(
    out_dir: Path,
    saved: tuple[ModelSpec, TaskBase, TrainSpec],
    resume: bool,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> tuple[int, dict[str, float], list[float]]:
    """Write the run's spec, task and settings (a resume checks them against the run's own
    first) and restore its checkpoint: (step, last evaluation, gradient norms since it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    refuse_links(out_dir, RUN_FILES)
    files = dict(zip(("spec.yaml", "task.yaml", "train.yaml"), saved))
    if resume:  # the run in out_dir must be this one: checked before anything is written
        for name, spec in files.items():
            same_as_saved(out_dir / name, spec)
    for name, spec in files.items():
        (out_dir / name).write_text(dump_spec(spec))
    step, last_eval, grad_norms = 0, {}, []
    if resume and (out_dir / "checkpoint" / "state.pt").is_file():
        step, last_eval, grad_norms = load_checkpoint(out_dir / "checkpoint", model, opt, gen)
    _truncate_metrics(out_dir / "metrics.jsonl", step)  # a fresh run, or records after the checkpoint
    return step, last_eval, grad_norms


def nonfinite(value: float, what: str, step: int) -> str:
    """The one divergence check: why the run diverged at `step`, or "" while `value` is finite."""
    return "" if math.isfinite(value) else f"non-finite {what} ({value}) at step {step}"


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Any, lr: float, clip: float | None, block_norms: bool
) -> tuple[float, float, dict[str, float]]:
    """One optimizer step at learning rate `lr`: (loss, pre-clip gradient norm, per-block
    gradient norms if `block_norms`). A non-finite loss (gradient norm nan) or gradient norm
    applies nothing."""
    for g in opt.param_groups:
        g["lr"] = lr
    device = next(model.parameters()).device
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    # a task that trains on few positions (MQAR: 4 of 63): the head and the loss read those
    # alone, the same mean over the same positions as ignore_index's
    trained = targets != IGNORE
    positions = trained if isinstance(model, TitansLM) and model.readout is None and not bool(trained.all()) else None
    with _autocast(device):
        logits, _ = model(inputs, positions=positions) if positions is not None else model(inputs)
    loss = loss_fn(logits, targets[positions] if positions is not None else targets)
    value = loss.item()  # one device sync for the loss
    if not math.isfinite(value):
        return value, math.nan, {}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norms = _block_grad_norms(model) if block_norms else {}  # before clipping rescales them
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf")))
    if math.isfinite(gnorm):
        opt.step()
    return value, gnorm, norms


def evaluation_record(
    model: torch.nn.Module,
    task: TaskBase,
    cfg: TrainSpec,
    device: torch.device,
    step: int,
    grad_norms: list[float],
    params: int,
    tokens_per_s: float,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The metrics record of an evaluation at `step` (the task's scores, memory health per
    block, the pre-clip gradient norms of the steps since the last evaluation) and the scores
    alone."""
    evaluation = evaluate(model, task, cfg, device, health=True)
    scores = {k: v for k, v in evaluation.items() if not k.startswith("block.")}
    record = {
        "step": step,
        "split": "eval",
        **scores,
        "grad_norm": statistics.median(grad_norms),
        "grad_norm_max": max(grad_norms),
        **{k: v for k, v in evaluation.items() if k.startswith("block.")},
        "params": params,
        "tokens_per_s": tokens_per_s,
        "peak_mem_mb": peak_mem_mb(device),
    }
    return record, scores


class Throughput:
    """Tokens per second of the steps since the last log line (`lap`); `last` is the latest."""

    def __init__(self) -> None:
        self.t0, self.tokens, self.last = time.perf_counter(), 0, 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def lap(self) -> float:
        self.last = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.t0, self.tokens = time.perf_counter(), 0
        return self.last


def health_lines(rec: dict[str, Any]) -> list[str]:
    """The memory health of an evaluation record, one line per block with a memory:
    `memory 0: surprise 1.93 -> 0.88  theta 0.050  eta 0.100  alpha 0.0070  |W| 5.1`."""
    blocks = sorted({int(k.split(".")[1]) for k in rec if k.startswith("block.") and k.endswith(".w_norm")})
    lines = []
    for b in blocks:
        get = lambda name: rec.get(f"block.{b}.{name}")  # noqa: E731
        parts = [f"memory {b}:"]
        if get("surprise_start") is not None:
            parts.append(f"surprise {get('surprise_start'):.3f} -> {get('surprise_end'):.3f}")
        parts.append(f"theta {get('theta'):.4f}")
        for name in ("eta", "alpha"):
            if get(name) is not None:
                parts.append(f"{name} {get(name):.4f}")
        parts.append(f"|W| {get('w_norm'):.2f}")
        lines.append("  ".join(parts))
    return lines


def read_metrics(path: Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records `train` wrote to `metrics.jsonl` (only those of `split` if given)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r.get("split") == split]


def eval_set(cfg: TrainSpec | dict[str, Any]) -> dict[str, int]:
    """What fixes a run's evaluation set (with the task): seed, batch size, number of batches."""
    c = cfg if isinstance(cfg, dict) else cfg.model_dump()
    return {"seed": c["eval_seed"], "batch_size": c["batch_size"], "batches": c["eval_batches"]}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records written after `step` (a resume's checkpoint; 0 for a fresh start): they
    are written again, so no step appears twice. A line cut short by a kill is dropped too."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def save_checkpoint(
    ckpt_dir: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    step: int,
    last_eval: dict[str, float] | None = None,
    grad_norms: list[float] | None = None,
) -> Path:
    """Weights as safetensors (what export ships) + optimizer, data-RNG state, the last evaluation
    and the gradient norms since it, for a resume that equals the uninterrupted run. Written to a
    temporary dir and renamed, so a crash never leaves a half checkpoint."""
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # what a crash mid-write left
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    extra = {"last_eval": json.dumps(last_eval or {}), "grad_norms": list(grad_norms or [])}
    torch.save({"optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step, **extra}, tmp / "state.pt")
    if ckpt_dir.exists():
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        ckpt_dir.rename(old)
        tmp.rename(ckpt_dir)
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    else:
        tmp.rename(ckpt_dir)
    return ckpt_dir


def load_checkpoint(
    ckpt_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
) -> tuple[int, dict[str, float], list[float]]:
    """Restore a checkpoint in place: (step, last evaluation, gradient norms since it). A
    damaged checkpoint is a clear error (exit 2), not a traceback."""
    try:
        model.load_state_dict(load_file(ckpt_dir / "model.safetensors"), strict=True)
        state = torch.load(ckpt_dir / "state.pt", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        return int(state["step"]), json.loads(state.get("last_eval", "{}")), list(state.get("grad_norms", []))
    except Exception as e:  # safetensors, pickle and shape errors alike: the checkpoint is unusable
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SpecError(str(ckpt_dir), "", f"damaged or foreign checkpoint, cannot resume: {reason}") from None


RUN_FILES = ("spec.yaml", "task.yaml", "train.yaml", "metrics.jsonl", "result.json", "checkpoint")
"""What `train` writes into its run directory."""


def refuse_links(directory: Path, names: tuple[str, ...]) -> None:
    """Refuse a run directory where a file this command writes is a symbolic link: writing would
    follow it and change a file elsewhere."""
    for name in names:
        if (directory / name).is_symlink():
            raise SpecError(str(directory / name), "", "is a symbolic link: refusing to write through it")


def same_as_saved(path: Path, spec: Spec) -> None:
    """A resumed run's spec, task or training settings must be the run's own: the first field
    that differs is named (exit 2) before anything in the directory changes."""
    if not path.is_file():
        raise SpecError(str(path), "", "missing: this directory holds no run to resume")
    saved = load_data(path, type(spec)).model_dump(mode="json")
    given = spec.model_dump(mode="json")
    for key in sorted(set(saved) | set(given)):
        if saved.get(key) != given.get(key):
            raise SpecError(
                str(path),
                key,
                f"the run was made with {json.dumps(saved.get(key))}, this command gives {json.dumps(given.get(key))}:"
                " resume with the run's own settings, or train into another --out",
            )


class SignalStop:
    """SIGINT / SIGTERM while training with a run directory: finish the current step, write a
    checkpoint and stop (`--resume` continues exactly). Only in the main thread (Ray trials run
    in worker threads and are stopped by Tune); `restore` puts the previous handlers back."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._note)

    def _note(self, signum: int, frame: Any) -> None:
        self.name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
