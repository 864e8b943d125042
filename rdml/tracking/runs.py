"""MLflow runs addressed by explicit run id: start, log, end.

Everything goes through :class:`mlflow.MlflowClient` with an explicit ``run_id``: there is no
global "active run", so the same calls work on the driver, inside a Ray actor or a Tune trial, and
for parent/child (nested) runs at the same time. With ``tracking.enabled=false`` :func:`start_run`
returns ``None`` and every function given a ``None`` run id does nothing.

MLflow names may only hold letters, digits, ``_ - . / : `` and spaces, so metric keys are passed
through :func:`metric_key` (``recall@1`` -> ``recall_at_1``).
"""

from __future__ import annotations

import copy
import re
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rdml.errors import TrackingError
from rdml.tracking.store import check_reachable, client, ensure_experiment, resolved_uri

if TYPE_CHECKING:
    from rdml.config import ExperimentConfig, TrackingConfig

_BAD_CHARS = re.compile(r"[^/\w.\- :]")
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LEN = 6000

#: run id -> tracking URI for runs started in this process (so callers need not pass the URI around)
_RUN_URIS: dict[str, str] = {}

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def metric_key(name: str) -> str:
    """An MLflow-safe metric/param key: ``@`` becomes ``_at_``, other bad characters ``_``."""
    return _BAD_CHARS.sub("_", name.replace("@", "_at_"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b.c": value}`` (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, prefix=f"{full}."))
        else:
            out[full] = value
    return out


def uri_of(run_id: str, tracking: TrackingConfig | str | None = None) -> str:
    """The store of ``run_id``: remembered from :func:`start_run`, else from ``tracking``/the environment."""
    if tracking is not None:
        return resolved_uri(tracking)
    return _RUN_URIS.get(run_id) or resolved_uri(None)


def remember(run_id: str, uri: str) -> None:
    """Record where ``run_id`` lives (used by workers that received both from the driver)."""
    _RUN_URIS[run_id] = uri


def start_run(
    cfg: ExperimentConfig,
    parent_run_id: str | None = None,
    nested: bool = False,
    tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> str | None:
    """Create a run for ``cfg`` and return its id (``None`` if tracking is disabled).

    Driver side: checks the store answers (:class:`TrackingError` otherwise, before any training),
    creates the experiment if needed, logs every config value as a dotted param and the config YAML as
    ``config.yaml``. ``parent_run_id`` makes it a child run (tag ``mlflow.parentRunId``); ``nested`` is
    accepted for symmetry with ``mlflow.start_run`` and requires a parent.
    """
    if not cfg.tracking.enabled:
        return None
    if nested and parent_run_id is None:
        raise TrackingError("start_run(nested=True) needs parent_run_id (runs are addressed by id, not by an active run)")
    uri = resolved_uri(cfg.tracking)
    check_reachable(uri)
    exp_id = ensure_experiment(uri, cfg.tracking.experiment)
    all_tags = {"rdml.config_name": cfg.name, "mlflow.source.name": "rdml"}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    all_tags.update(tags or {})
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        run = c.create_run(exp_id, tags=all_tags, run_name=run_name or cfg.tracking.run_name or cfg.name)
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {uri} refused to create a run: {exc.message}") from None
    run_id = run.info.run_id
    remember(run_id, uri)
    log_params(run_id, flatten(cfg.to_dict()), tracking=uri)
    c.log_text(run_id, cfg.to_yaml(), "config.yaml")
    return run_id


def log_params(run_id: str | None, params: Mapping[str, Any], tracking: TrackingConfig | str | None = None) -> None:
    """Log params (values stringified, batched 100 per request)."""
    if run_id is None or not params:
        return
    from mlflow.entities import Param

    items = [Param(metric_key(k), _param_value(v)) for k, v in params.items()]
    c = client(uri_of(run_id, tracking))
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        c.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH], synchronous=True)


def _param_value(v: Any) -> str:
    s = "None" if v is None else str(v)
    return s[:_MAX_PARAM_LEN]


def metric_entities(metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> list[Any]:
    """MLflow ``Metric`` entities for the numeric entries of ``metrics`` (others are skipped)."""
    from mlflow.entities import Metric

    ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
    out = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (str, bytes)) or value is None:
            continue
        try:
            fv = float(value)
        except (TypeError, ValueError):
            continue
        out.append(Metric(metric_key(key), fv, ts, int(step)))
    return out


def log_metric_entities(run_id: str | None, entities: list[Any], tracking: TrackingConfig | str | None = None) -> None:
    """Send pre-built metric entities in as few ``log_batch`` requests as possible."""
    if run_id is None or not entities:
        return
    c = client(uri_of(run_id, tracking))
    for i in range(0, len(entities), _MAX_METRICS_PER_BATCH):
        c.log_batch(run_id, metrics=entities[i : i + _MAX_METRICS_PER_BATCH], synchronous=True)


def log_metrics(
    run_id: str | None, metrics: Mapping[str, Any], step: int = 0, tracking: TrackingConfig | str | None = None
) -> None:
    """Log numeric ``metrics`` at ``step`` in one batched request (non-numeric values are skipped)."""
    log_metric_entities(run_id, metric_entities(metrics, step), tracking)


def set_tags(run_id: str | None, tags: Mapping[str, Any], tracking: TrackingConfig | str | None = None) -> None:
    if run_id is None:
        return
    c = client(uri_of(run_id, tracking))
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def log_artifact(
    run_id: str | None, path: str | Path, artifact_path: str | None = None, tracking: TrackingConfig | str | None = None
) -> None:
    """Upload a file (or a whole directory) to the run's artifacts."""
    if run_id is None:
        return
    path = Path(path)
    c = client(uri_of(run_id, tracking))
    if path.is_dir():
        c.log_artifacts(run_id, str(path), artifact_path)
    else:
        c.log_artifact(run_id, str(path), artifact_path)


def log_dict(run_id: str | None, d: Mapping[str, Any], name: str, tracking: TrackingConfig | str | None = None) -> None:
    """Store ``d`` as a JSON (``.json``) or YAML (``.yaml``/``.yml``) artifact named ``name``."""
    if run_id is None:
        return
    client(uri_of(run_id, tracking)).log_dict(run_id, dict(d), name)


def log_text(run_id: str | None, text: str, name: str, tracking: TrackingConfig | str | None = None) -> None:
    if run_id is None:
        return
    client(uri_of(run_id, tracking)).log_text(run_id, text, name)


def log_figure(run_id: str | None, fig: Any, name: str, tracking: TrackingConfig | str | None = None) -> None:
    """Store a matplotlib figure as an image artifact (``name`` like ``plots/loss.png``)."""
    if run_id is None:
        return
    client(uri_of(run_id, tracking)).log_figure(run_id, fig, name)


def log_model(
    run_id: str | None, model: Any, name: str = "model", tracking: TrackingConfig | str | None = None
) -> str | None:
    """Log a torch model with ``mlflow.pytorch.log_model`` (MLflow 3: ``name=``); returns its model URI.

    The model is copied to CPU so it loads anywhere, and pickled (MLflow 3.17 defaults to the
    torch.export "pt2" format, which needs an input example and traceable forward code). pip requirements are given explicitly: MLflow's
    inference would re-import the model in a subprocess, which costs seconds and needs rdml installed.
    """
    if run_id is None:
        return None
    import mlflow
    import mlflow.pytorch
    import torch

    uri = uri_of(run_id, tracking)
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    with _tracking_uri(uri), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pytorch.log_model(
            cpu_model, name=name, run_id=run_id, pip_requirements=reqs, serialization_format="pickle"
        )
    return info.model_uri


def _tracking_uri(uri: str) -> Any:
    """Temporarily point MLflow's fluent API at ``uri`` (``log_model`` has no client form)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    return _use_tracking_uri(uri)


def run_status(run_id: str, tracking: TrackingConfig | str | None = None) -> str:
    """``RUNNING``, ``FINISHED``, ``FAILED`` or ``KILLED``."""
    return client(uri_of(run_id, tracking)).get_run(run_id).info.status


def end_run(run_id: str | None, status: str = "FINISHED", tracking: TrackingConfig | str | None = None) -> None:
    """Mark the run ended with ``status`` (FINISHED, FAILED or KILLED)."""
    if run_id is None:
        return
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
    client(uri_of(run_id, tracking)).set_terminated(run_id, status)


def end_run_if_running(run_id: str | None, status: str, tracking: TrackingConfig | str | None = None) -> bool:
    """End the run with ``status`` only if it is still RUNNING; True if it was ended here."""
    if run_id is None:
        return False
    if run_status(run_id, tracking) != "RUNNING":
        return False
    end_run(run_id, status, tracking)
    return True


def child_runs(parent_run_id: str, tracking: TrackingConfig | str | None = None) -> list[Any]:
    """Runs whose ``mlflow.parentRunId`` tag is ``parent_run_id``."""
    c = client(uri_of(parent_run_id, tracking))
    exp_id = c.get_run(parent_run_id).info.experiment_id
    return c.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10000)


def download_artifact(run_id: str, name: str, tracking: TrackingConfig | str | None = None) -> Path:
    """Fetch one artifact to a temp dir (tests, report)."""
    dst = tempfile.mkdtemp(prefix="rdml-artifact-")
    return Path(client(uri_of(run_id, tracking)).download_artifacts(run_id, name, dst))


def list_artifacts(run_id: str, path: str | None = None, tracking: TrackingConfig | str | None = None) -> list[str]:
    return [f.path for f in client(uri_of(run_id, tracking)).list_artifacts(run_id, path)]


def load_logged_model(model_uri: str, run_id: str | None = None, tracking: TrackingConfig | str | None = None) -> Any:
    """Load a model logged with :func:`log_model` (``models:/...`` or ``runs:/...``) from its store."""
    import mlflow.pytorch

    uri = uri_of(run_id, tracking) if run_id else resolved_uri(tracking)
    with _tracking_uri(uri):
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")
