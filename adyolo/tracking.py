"""MLflow: one run per training job, written by the main process only.

The store defaults to a SQLite file in the run directory (`sqlite:///<output_dir>/mlflow.db`),
with artifacts beside it; $MLFLOW_TRACKING_URI or `log.tracking_uri` point elsewhere (a server,
for many writers). A resumed job continues the same MLflow run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow

MAX_PARAM_CHARS = 6000  # MLflow rejects longer parameter values


def tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"size": "s"}} -> {"model.size": "s"}; lists become their string."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _set_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri for this process only. MLflow also exports it as $MLFLOW_TRACKING_URI,
    which every later child of this process (a training run started from the same Python process, a
    test's subprocess) would inherit and log into; the environment is put back as it was."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _run_exists(run_id: str) -> bool:
    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


class Tracker:
    """Thin wrapper so the loop never asks who may write: every call is a no-op off the main process."""

    def __init__(
        self,
        enabled: bool,
        uri: str,
        experiment: str,
        output_dir: str | Path,
        run_name: str | None = None,
        run_id: str | None = None,
    ):
        self.enabled = enabled
        self.run_id = run_id
        if not enabled:
            return
        _set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            artifacts = (Path(output_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
            experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts)
        else:
            experiment_id = found.experiment_id
        if run_id is not None and not _run_exists(run_id):
            run_id = None  # resumed from a checkpoint written with another store: start a new run
        self.run = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name)
        self.run_id = self.run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled:
            values = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()}
            existing = mlflow.get_run(self.run_id).data.params
            # A resumed run may not change a parameter it already logged.
            mlflow.log_params({k: v for k, v in values.items() if k not in existing})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.enabled:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.enabled:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            mlflow.end_run(status=status)
