"""Evaluate trained models: a task's metric on its eval set, and the needle-in-a-haystack grid
(context length x needle depth, as in the RULER / Titans figures) with a heatmap and a table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from titans_nas.builder import build_model
from titans_nas.config import SpecError, load_spec
from titans_nas.model import TitansLM
from titans_nas.spec import ModelSpec
from titans_nas.tasks import NIAHSpec, TaskBase
from titans_nas.train import TrainSpec, check_compatible, evaluate, saved_task


def load_run(run_dir: str | Path) -> tuple[ModelSpec, TitansLM]:
    """The spec and trained weights of a training run directory (spec.yaml + checkpoint/) or of
    an export directory (checked: hashes, safetensors only)."""
    from titans_nas.export import is_export, load_export

    run = Path(run_dir)
    if is_export(run):
        spec, model, _ = load_export(run)
        return spec, model
    weights = run / "checkpoint" / "model.safetensors"
    if not (run / "spec.yaml").is_file() or not weights.is_file():
        raise SpecError(str(run), "", "not a training run: spec.yaml or checkpoint/model.safetensors is missing")
    spec = load_spec(run / "spec.yaml")
    model = build_model(spec, saved_task(run))
    model.load_state_dict(load_file(weights), strict=True)
    return spec, model.eval()


def evaluate_task(
    model: TitansLM, spec: ModelSpec, task: TaskBase, batches: int = 8, batch_size: int = 16, seed: int | None = None
) -> dict:
    """Loss and task metric on the fixed evaluation set `train` uses (seed, batches, batch size)."""
    check_compatible(spec, task)
    cfg = TrainSpec(eval_batches=batches, batch_size=batch_size)
    cfg = cfg if seed is None else cfg.model_copy(update={"eval_seed": seed})
    return evaluate(model, task, cfg, next(model.parameters()).device)


@dataclass
class Grid:
    lengths: list[int]
    depths: list[float]
    scores: list[list[float]]
    """scores[i][j]: exact match at lengths[i], depths[j]."""

    def markdown(self, title: str) -> str:
        head = "| context \\ depth | " + " | ".join(f"{d:.0%}" for d in self.depths) + " | mean |"
        rows = [head, "|" + "---|" * (len(self.depths) + 2)]
        for n, row in zip(self.lengths, self.scores):
            rows.append(f"| {n} | " + " | ".join(f"{s:.2f}" for s in row) + f" | {sum(row) / len(row):.2f} |")
        return f"### {title}\n\n" + "\n".join(rows) + "\n"

    def heatmap(self, path: Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.1 + 0.7 * len(self.depths), 0.9 + 0.45 * len(self.lengths)))
        im = ax.imshow(self.scores, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(self.depths)), [f"{d:.0%}" for d in self.depths])
        ax.set_yticks(range(len(self.lengths)), [str(n) for n in self.lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context length (bytes)")
        for i, row in enumerate(self.scores):
            for j, s in enumerate(row):
                ax.text(j, i, f"{s:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="exact match")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@torch.no_grad()
def niah_grid(
    model: TitansLM,
    task: NIAHSpec,
    lengths: list[int],
    depths: list[float],
    samples: int = 20,
    seed: int = 0,
    batch_size: int = 10,
) -> Grid:
    """Exact match per (context length, depth) cell over `samples` eval-split examples each.
    Long contexts are read through the streaming state in pieces, so memory stays flat."""
    scores = []
    for n in lengths:
        row = []
        for d in depths:
            cell = task.model_copy(update={"context_len": n, "depth": d})
            gen = torch.Generator().manual_seed(seed + 7919 * n + int(1000 * d))
            hits = total = 0.0
            for start in range(0, samples, batch_size):
                batch = cell.sample(min(batch_size, samples - start), gen, "eval")
                logits = _logits_streamed(model, batch.inputs)
                num, den = cell.score(logits, batch)["exact_match"]
                hits, total = hits + num, total + den
            row.append(hits / total)
        scores.append(row)
    return Grid(lengths, depths, scores)


def _logits_streamed(model: TitansLM, tokens: torch.Tensor, piece: int = 2048) -> torch.Tensor:
    if tokens.shape[1] <= piece:
        return model(tokens)[0]
    state, outs = model.init_state(tokens.shape[0]), []
    for start in range(0, tokens.shape[1], piece):
        logits, state = model(tokens[:, start : start + piece], state)
        outs.append(logits)
    return torch.cat(outs, 1)
