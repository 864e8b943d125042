"""MLflow runs addressed by explicit run id: start, log, end.

Everything goes through :class:`mlflow.MlflowClient` with an explicit ``run_id``: there is no
global "active run", so the same calls work on the driver, inside a Ray actor or a Tune trial, and
for parent/child (nested) runs at the same time. With ``tracking.enabled=false`` :func:`start_run`
returns ``None`` and every function given a ``None`` run id does nothing.

MLflow names may only hold letters, digits, ``_ - . / : `` and spaces, so metric keys are passed
through :func:`metric_key` (``recall@1`` -> ``recall_at_1``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
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
    run_id: str | None, model: Any, name: str = "model", tracking: TrackingConfig | str | None = None, *,
    spec: Mapping[str, Any],
) -> str | None:
    """Log ``model`` as an MLflow LoggedModel of the run's own experiment; returns ``models:/<model_id>``.

    ``spec`` describes how rdml rebuilds it (:func:`rdml.tracking.modelfiles.model_spec`). The model is
    created explicitly in the run's experiment: ``mlflow.pytorch.log_model`` alone creates it in the
    fluent API's *current* experiment, which for a client addressing runs by id is MLflow's Default
    experiment (files under ``mlruns/0``, and "Logged models (0)" on the run's page).

    Two forms, neither of them a pickle: ``rdml/`` (weights + JSON, what :func:`load_logged_model`
    reads) and MLflow's ``pytorch`` flavour in its ``pt2`` format (a ``torch.export`` graph, traced on
    a zero input of the spec's geometry) for MLflow's own tools. If the export fails for some model,
    the logged model keeps only ``rdml/`` (a warning says so). pip requirements are given explicitly:
    MLflow's inference would re-import the model in a subprocess (seconds, and needs rdml).
    """
    if run_id is None:
        return None
    import mlflow
    import mlflow.pytorch
    import torch

    from rdml.tracking.modelfiles import write_model_dir

    uri = uri_of(run_id, tracking)
    c = client(uri)
    experiment_id = c.get_run(run_id).info.experiment_id
    cpu_model = copy.deepcopy(model).to("cpu").eval()
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    logged = c.create_logged_model(
        experiment_id, name=name, source_run_id=run_id,
        tags={"rdml.kind": str(spec.get("kind")), "rdml.load_with": "rdml.tracking.load_logged_model (rdml/)"},
    )
    with tempfile.TemporaryDirectory(prefix="rdml-model-") as tmp:
        write_model_dir(cpu_model, dict(spec), tmp)
        c.log_model_artifacts(logged.model_id, tmp, "rdml")
    example = torch.zeros(2, int(spec["in_channels"]), int(spec["image_size"]), int(spec["image_size"])).numpy()
    try:
        with _tracking_uri(uri), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlflow.pytorch.log_model(cpu_model, name=name, run_id=run_id, model_id=logged.model_id,
                                     input_example=example, serialization_format="pt2",
                                     pip_requirements=reqs, validate_serving_input=False)
    except Exception as exc:  # noqa: BLE001 - torch.export cannot trace every model; rdml/ is enough for rdml
        from mlflow.entities import LoggedModelStatus

        warnings.warn(f"model {logged.model_id} logged without MLflow's pytorch flavour (torch.export failed: "
                      f"{type(exc).__name__}: {exc}); rdml loads it from its rdml/ files", stacklevel=2)
        c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        c.log_outputs(run_id, [_model_output(logged.model_id)])
    return f"models:/{logged.model_id}"


def _model_output(model_id: str) -> Any:
    from mlflow.entities import LoggedModelOutput

    return LoggedModelOutput(model_id, step=0)


def logged_models(run_id: str, tracking: TrackingConfig | str | None = None) -> list[Any]:
    """The LoggedModels whose source run is ``run_id`` (searched in the run's experiment)."""
    c = client(uri_of(run_id, tracking))
    exp_id = c.get_run(run_id).info.experiment_id
    return list(c.search_logged_models([exp_id], filter_string=f"source_run_id = '{run_id}'"))


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's fluent API at ``uri`` (``log_model`` has no client form).

    MLflow's own ``_use_tracking_uri`` mirrors the URI into ``$MLFLOW_TRACKING_URI`` and, on exit,
    *deletes* that variable when no fluent URI had been set before: every later call of this process
    that resolves the store from the environment would then open ``./mlflow.db``. The variable is restored.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


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


def experiment_run_ids(experiment: str, tracking: TrackingConfig | str | None = None) -> list[str]:
    """Ids of every run of the experiment named ``experiment`` (TrackingError when it does not exist)."""
    uri = resolved_uri(tracking)
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"the MLflow store {uri} has no experiment {experiment!r}; list them in `rdml ui`, or "
                            "pass the experiment the runs were logged to (tracking.experiment)")
    runs = c.search_runs([exp.experiment_id], max_results=50000)
    for run in runs:
        remember(run.info.run_id, uri)
    return [run.info.run_id for run in runs]


def download_artifact(run_id: str, name: str, tracking: TrackingConfig | str | None = None) -> Path:
    """Fetch one artifact to a temp dir (tests, report)."""
    dst = tempfile.mkdtemp(prefix="rdml-artifact-")
    return Path(client(uri_of(run_id, tracking)).download_artifacts(run_id, name, dst))


def list_artifacts(run_id: str, path: str | None = None, tracking: TrackingConfig | str | None = None) -> list[str]:
    return [f.path for f in client(uri_of(run_id, tracking)).list_artifacts(run_id, path)]


def load_logged_model(model_uri: str, run_id: str | None = None, tracking: TrackingConfig | str | None = None,
                      device: str = "cpu") -> Any:
    """Load a model logged with :func:`log_model` (``models:/<model_id>``) from its ``rdml/`` files.

    Only weights (``torch.load(weights_only=True)``) and JSON are read; the pickled ``pytorch``
    flavour beside them is never loaded, so a tampered artifact cannot run code here.
    """
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from rdml.tracking.modelfiles import read_model_dir

    uri = uri_of(run_id, tracking) if run_id else resolved_uri(tracking)
    if not model_uri.startswith("models:/"):
        raise TrackingError(f"{model_uri!r} is not a logged-model URI; pass the models:/<model_id> that "
                            "rdml printed or logged (MLflow UI: the run's Logged models)")
    model_id = model_uri[len("models:/"):].strip("/").split("/")[0]
    try:
        location = client(uri).get_logged_model(model_id).artifact_location
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {uri} has no logged model {model_id}: {exc.message}") from None
    with tempfile.TemporaryDirectory(prefix="rdml-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/rdml", dst_path=tmp,
                                                        tracking_uri=uri)
        except (MlflowException, OSError) as exc:
            raise TrackingError(f"logged model {model_uri} has no rdml/ weights ({exc}); rdml never unpickles "
                                "MLflow's pytorch flavour: re-log the model with rdml") from None
        return read_model_dir(local, device=device)


def resume_run(
    cfg: ExperimentConfig, run_id: str, tags: Mapping[str, str] | None = None, run_name: str | None = None,
) -> str | None:
    """Reopen run ``run_id`` for a resumed training (status RUNNING again); returns the run id to log into.

    Params are immutable in MLflow: config values changed on resume (``--set train.epochs=...``) are
    recorded as ``rdml.resumed.<key>`` tags, new keys as params. When the store does not know the run
    (another store, or deleted) a new run is started, linked by the tag ``rdml.resumed_from``.
    """
    if not cfg.tracking.enabled:
        return None
    from mlflow.exceptions import MlflowException

    uri = resolved_uri(cfg.tracking)
    check_reachable(uri)
    c = client(uri)
    try:
        run = c.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        return start_run(cfg, tags={**(tags or {}), "rdml.resumed_from": run_id}, run_name=run_name)
    remember(run_id, uri)
    c.update_run(run_id, status="RUNNING")
    old = run.data.params
    flat = {metric_key(k): _param_value(v) for k, v in flatten(cfg.to_dict()).items()}
    log_params(run_id, {k: v for k, v in flat.items() if k not in old}, tracking=uri)
    resumes = int(run.data.tags.get("rdml.resumes", "0")) + 1
    changed = {f"rdml.resumed.{k}": v for k, v in flat.items() if k in old and old[k] != v}
    set_tags(run_id, {**(tags or {}), **changed, "rdml.resumes": resumes}, tracking=uri)
    return run_id


def log_files(run_id: str | None, root: str | Path, files: list[str], artifact_path: str,
              tracking: TrackingConfig | str | None = None) -> None:
    """Upload ``root/<f>`` for every relative path ``f`` to ``<artifact_path>/<f>`` (the layout is kept)."""
    if run_id is None:
        return
    c = client(uri_of(run_id, tracking))
    root = Path(root)
    for rel in files:
        parent = Path(rel).parent.as_posix()
        dest = artifact_path if parent in ("", ".") else f"{artifact_path}/{parent}"
        c.log_artifact(run_id, str(root / rel), dest)
