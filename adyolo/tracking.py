"""MLflow: one run per training job, written by the main process only.

The store defaults to a SQLite file in the run directory (`sqlite:///<output_dir>/mlflow.db`),
with artifacts beside it in `<output_dir>/mlartifacts`; $MLFLOW_TRACKING_URI or `log.tracking_uri`
point elsewhere (a server, for many writers). A resumed job continues the same MLflow run.

MLflow stores artifact locations as absolute paths. A run folder that is copied or moved keeps its
artifacts reachable because `relocate_store` points the store at the folder it now lies in; the
trainer does this when it opens the store, and `launch/ui.py` before it starts the UI.

The experiment is tagged as model training (`mlflow.experimentKind`), so MLflow 3's UI opens it in
its training view rather than the GenAI one. Metric values are rounded to 6 significant digits:
float noise in the 15th digit only makes the UI's tables harder to read.

A tracking server (an http(s) URI) is asked whether it answers before a run starts
(`check_tracking_server`: a few seconds, not MLflow's four minutes of retries). One that stops
answering during the run costs its charts, never the run: the tracker warns once and stops talking to
it (results.csv, results.png and the checkpoints go on in the run folder).

MLflow is imported where a store is opened, not with this module: it is a third of the import time of
`adyolo.run` (docs/measurements.md), and only the main process of a run writes (nor need a run refused
for bad input wait for it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from adyolo.schema import ConfigError

MAX_PARAM_CHARS = 6000  # MLflow rejects longer parameter values
STORE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
RESERVE_FILE, RESERVE_BYTES = ".mlflow-reserve", 2**20
# MLflow 3's UI shows an experiment in its GenAI or its model-training view by this tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the UI
SIGNIFICANT_DIGITS = 6
ANSWER_TIMEOUT_S = 5.0  # how long a tracking server has to answer before the run starts without it
# MLflow retries a request for about four minutes by default (rate limits); against a server that is gone
# that stalls training. A tracker on a server uses these unless the environment sets its own.
SERVER_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def tracking_uri(configured: str | None, output_dir: str | Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return default_store_uri(output_dir)


def default_store_uri(output_dir: str | Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / STORE_FILE}"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def unanswered(uri: str, timeout: float = ANSWER_TIMEOUT_S) -> str | None:
    """Why the tracking server at `uri` does not answer (refused, timed out, unknown host), or None when
    it answers at all (any HTTP status: a proxy or its authentication is MLflow's to report)."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return str(reason) or type(reason).__name__


def check_tracking_server(configured: str | None, output_dir: str | Path) -> None:
    """Raise `ConfigError` (naming the URI, where it was set and how to log without it) when the run's
    store is a tracking server that does not answer within `ANSWER_TIMEOUT_S`."""
    uri = tracking_uri(configured, output_dir)
    if not is_server(uri) or (problem := unanswered(uri)) is None:
        return
    own = default_store_uri(output_dir)
    if configured:
        key, instead = "log.tracking_uri", f"set log.tracking_uri={own}"
    else:
        key, instead = "MLFLOW_TRACKING_URI", "unset MLFLOW_TRACKING_URI"
    raise ConfigError(
        key,
        f"the MLflow tracking server {uri} does not answer ({problem}); start it, or {instead} to log into "
        f"the run folder's own store ({own})",
    )


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


def rounded(value: float) -> float:
    """`value` to `SIGNIFICANT_DIGITS` significant digits (0.30000000000000004 -> 0.3)."""
    return float(f"{float(value):.{SIGNIFICANT_DIGITS}g}")


def relocate_store(output_dir: str | Path) -> bool:
    """Point the run folder's own store (`<output_dir>/mlflow.db`) at the artifacts beside it, if it was
    written in another place (a copied or moved run folder). Returns whether anything changed. A store
    that is not there, or whose artifacts live elsewhere by choice (not in an `mlartifacts` folder),
    is left alone."""
    folder = Path(output_dir).resolve()
    db = folder / STORE_FILE
    if not db.is_file():
        return False
    here = (folder / ARTIFACTS_FOLDER).as_uri()
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT artifact_location FROM experiments").fetchall()
        old = {loc for (loc,) in rows if loc and loc.endswith("/" + ARTIFACTS_FOLDER) and loc != here}
        for location in old:
            for table, column in (
                ("experiments", "artifact_location"),
                ("runs", "artifact_uri"),
                ("logged_models", "artifact_location"),
            ):
                connection.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (here, len(location) + 1, len(location), location),
                )
    return bool(old)


def _set_tracking_uri(uri: str) -> None:
    """mlflow.set_tracking_uri for this process only. MLflow also exports it as $MLFLOW_TRACKING_URI,
    which every later child of this process (a training run started from the same Python process, a
    test's subprocess) would inherit and log into; the environment is put back as it was."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _run_exists(run_id: str) -> bool:
    import mlflow

    try:
        mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


class Tracker:
    """Thin wrapper so the loop never asks who may write: every call is a no-op off the main process.

    `system_metrics`: MLflow's system-metrics logging (its own thread, in this process: the main
    process's node; psutil is a requirement); GPUs are included where nvidia-ml-py is. It samples every
    10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL changes that)."""

    def __init__(
        self,
        enabled: bool,
        uri: str,
        experiment: str,
        output_dir: str | Path,
        run_name: str | None = None,
        run_id: str | None = None,
        system_metrics: bool = False,
    ):
        self.enabled = enabled
        self.run_id = run_id
        self.uri = uri
        self.output_dir = Path(output_dir)
        self._warned = False
        self._offline = False  # a tracking server that stopped answering is not asked again
        self._reserve: Path | None = None
        self._environment: dict[str, str | None] = {}  # what `SERVER_RETRIES` replaced, put back by `finish`
        if not enabled:
            return
        import mlflow

        if is_server(uri):
            self._environment = {k: os.environ.get(k) for k in SERVER_RETRIES}
            for key, value in SERVER_RETRIES.items():
                os.environ.setdefault(key, value)

        # "Creating initial MLflow database tables..." and the like, on every new store.
        # Its errors (logged with a traceback) also raise to the caller, where `_tolerated` names them.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # "Started monitoring ...", and its own word when the store fails (`_tolerated` says that once).
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        if uri == default_store_uri(output_dir):
            relocate_store(output_dir)
            # Space set aside beside the store and given up by `finish`: a run that ends on a full disk
            # can still be marked FAILED instead of staying RUNNING.
            self._reserve = Path(output_dir) / RESERVE_FILE
            self._reserve.parent.mkdir(parents=True, exist_ok=True)
            self._reserve.write_bytes(bytes(RESERVE_BYTES))
        _set_tracking_uri(uri)
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            artifacts = (Path(output_dir).resolve() / ARTIFACTS_FOLDER).as_uri() if uri.startswith("sqlite") else None
            experiment_id = mlflow.create_experiment(experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        else:
            experiment_id = found.experiment_id
            for key, value in EXPERIMENT_KIND.items():
                if found.tags.get(key) != value:
                    mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
        if run_id is not None and not _run_exists(run_id):
            run_id = None  # resumed from a checkpoint written with another store: start a new run
        self.run = mlflow.start_run(
            run_id=run_id,
            experiment_id=experiment_id,
            run_name=run_name,
            log_system_metrics=system_metrics,
        )
        self.run_id = self.run.info.run_id

    @property
    def writing(self) -> bool:
        """Whether calls reach the store: on the main process, while the store answers."""
        return self.enabled and not self._offline

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.writing:
            import mlflow

            values = {k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()}
            with self._tolerated("log parameters"):
                existing = mlflow.get_run(self.run_id).data.params
                # A resumed run may not change a parameter it already logged.
                mlflow.log_params({k: v for k, v in values.items() if k not in existing})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.writing:
            import mlflow

            with self._tolerated("set tags"):
                mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def describe(self, markdown: str) -> None:
        """The run's description (the UI's "Description" box)."""
        self.set_tags({DESCRIPTION_TAG: markdown})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.writing:
            import mlflow

            with self._tolerated("log metrics"):
                mlflow.log_metrics({k: rounded(v) for k, v in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self.writing:
            import mlflow

            with self._tolerated("log an artifact"):
                mlflow.log_artifact(str(path), artifact_path=folder)

    def log_artifacts(self, local_dir: str | Path, folder: str | None = None) -> None:
        if self.writing:
            import mlflow

            with self._tolerated("log artifacts"):
                mlflow.log_artifacts(str(local_dir), artifact_path=folder)

    @contextlib.contextmanager
    def _tolerated(self, what: str):
        """A store that cannot take a write (a full disk, a tracking server gone) costs charts, not the
        run: warned about once, and training goes on (its checkpoints say whether it can). A tracking
        server that no longer answers is not asked again."""
        import mlflow
        import sqlalchemy

        try:
            yield
        except (OSError, mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError) as err:
            gone = is_server(self.uri) and unanswered(self.uri) is not None
            self._offline = self._offline or gone
            if not self._warned:
                self._warned = True
                lines = [line for line in str(err).splitlines() if line and not line.startswith("(raised as")]
                reason = lines[0][:200] if lines else type(err).__name__
                if gone:
                    print(
                        f"warning: the MLflow tracking server {self.uri} stopped answering ({reason[:120]}); training "
                        f"goes on without it: results.csv, results.png and the checkpoints in {self.output_dir} "
                        f"keep the record (its run {self.run_id} stays RUNNING there)",
                        file=sys.stderr,
                    )
                else:
                    print(f"warning: MLflow could not {what} ({reason}); training goes on", file=sys.stderr)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of a metric logged so far in this run, also by the job before a resume."""
        if not self.writing:
            return []
        import mlflow

        found = []
        with self._tolerated(f"read the history of {key}"):
            found = mlflow.MlflowClient().get_metric_history(self.run_id, key)
        return sorted((m.step, m.value) for m in found)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            import mlflow

            if self._reserve is not None:  # room for the last write, should the disk be full
                self._reserve.unlink(missing_ok=True)
            # Also when the server stopped answering: it may be back, and the run is ended in this process.
            with self._tolerated(f"end the run ({status})"):
                mlflow.end_run(status=status)
            for key, value in self._environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
