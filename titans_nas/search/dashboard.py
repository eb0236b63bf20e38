"""A live view of a study: optuna-dashboard serving the run's Optuna storage on localhost.
It reads the same storage the searcher writes, so a running study updates in the browser."""

from __future__ import annotations

from pathlib import Path

from titans_nas.config import SpecError
from titans_nas.search.study import SearchStudySpec, load_study


def storage_of(run_dir: Path) -> str:
    """The run's Optuna storage URL; only search studies have one (ablations and grids do not
    sample, and `study status` / `report` show them)."""
    from titans_nas.search.engine import read_state, storage_url

    read_state(run_dir)
    study = load_study(run_dir / "study.yaml")
    if not isinstance(study.spec, SearchStudySpec):
        raise SpecError(
            str(run_dir), "kind", f"a {study.kind} study has no Optuna storage; `study status` shows its trials"
        )
    url = storage_url(study, run_dir)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise SpecError(str(run_dir), "storage", "the study has not created its Optuna storage yet")
    return url


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Block serving the dashboard at http://host:port/ until interrupted."""
    url = storage_of(Path(run_dir))
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise SpecError(
            str(run_dir), "", "optuna-dashboard is not installed: pip install 'titans-nas[dashboard]'"
        ) from None
    run_server(url, host=host, port=port)
