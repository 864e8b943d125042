"""Where runs are stored: resolving the tracking URI, checking it answers, creating experiments.

The store is chosen once, on the driver, before any training starts: ``tracking.uri`` from the config,
else ``$MLFLOW_TRACKING_URI``, else a sqlite database in the current directory (MLflow 3 refuses plain
file stores, and sqlite keeps every run queryable by ``rdml ui``). A server that does not answer is a
:class:`~rdml.errors.TrackingError` *before* training, never an exception an hour into a run.
"""

from __future__ import annotations

import base64
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from rdml.errors import TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from rdml.config import TrackingConfig

#: seconds the reachability probe waits for a tracking server before giving up
PROBE_TIMEOUT_S = 3.0


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the explicit one, else ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    plain = "://" not in uri and not uri.startswith(("databricks", "sqlite:"))
    if plain or (uri.startswith("file:") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true"):
        folder = Path(urllib.parse.urlparse(uri).path if not plain else uri).resolve()
        raise TrackingError(
            f"tracking uri {uri!r} is an MLflow file store, which MLflow 3 refuses; use a sqlite store such as "
            f"tracking.uri=sqlite:///{folder}/mlflow.db or a server URL such as http://127.0.0.1:5000 "
            "(or set MLFLOW_ALLOW_FILE_STORE=true to keep the file store)"
        )
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def artifact_root(uri: str) -> str | None:
    """Where artifacts of a local sqlite store go: next to the database, never in the CWD."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return str(db.parent.resolve() / "mlartifacts")


#: an API call every working server answers; unlike ``/health`` it passes MLflow's Host-header and
#: auth checks, so a server that would refuse the client's requests fails the probe too
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def check_reachable(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` if the store cannot be used (server down or refusing, unwritable directory).

    HTTP servers are probed with a short timeout instead of a client call, because the MLflow client
    retries a refused connection with backoff for minutes before failing. ``/health`` alone is not
    enough: MLflow 3 exempts it from the Host-header validation, so a server started with
    ``--host 0.0.0.0`` answers it from any machine while refusing every API call (``403 Invalid Host
    header``). The probe therefore also sends one read-only API request, with the client's credentials.
    Inside a Ray job, a local sqlite store in Ray's temporary directories is refused
    (:func:`rdml.jobenv.require_durable_store`).
    """
    if uri.startswith(("http://", "https://")):
        _probe_server(uri, timeout)
        return
    from rdml.jobenv import require_durable_store

    require_durable_store(uri)
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the directory of the MLflow sqlite store {uri}: {exc}; "
                "set tracking.uri to a writable location"
            ) from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"the MLflow sqlite store {uri} is not writable; set tracking.uri to a writable location")


def _auth_headers() -> dict[str, str]:
    """The credentials the MLflow client would send (token, else basic auth) from its environment variables."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _probe_server(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    host = urllib.parse.urlsplit(base).netloc
    for path in ("/health", API_PROBE):
        request = urllib.request.Request(base + path, headers=_auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                if resp.status == 200:
                    continue
                code, body = resp.status, ""
        except urllib.error.HTTPError as exc:
            code, body = exc.code, exc.read(300).decode(errors="replace").strip()
        except (OSError, ValueError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} did not answer ({getattr(exc, 'reason', exc)}) within "
                f"{timeout:.0f} s. Start it (`rdml ui` or `mlflow server --host 127.0.0.1 --port <port>`), or point "
                "tracking.uri / MLFLOW_TRACKING_URI at a running server or a sqlite store "
                "(tracking.uri=sqlite:///path/mlflow.db), or disable tracking with --set tracking.enabled=false"
            ) from None
        raise TrackingError(_refusal(uri, host, path, code, body))


def _refusal(uri: str, host: str, path: str, code: int, body: str) -> str:
    """The message for a server that answers but refuses ``path`` with HTTP ``code``."""
    what = f"MLflow tracking server {uri} refused {path.split('?')[0]} with HTTP {code}" + (f" ({body})" if body else "")
    if code == 403 and "host" in body.lower():
        return (f"{what}: it does not accept requests addressed to {host}. Restart it with that name allowed: "
                f"`rdml ui --host 0.0.0.0 --allowed-hosts {host.rsplit(':', 1)[0]}` (or `mlflow server "
                f"--allowed-hosts {host}`), or use an address it accepts (localhost and private IPs by default)")
    if code in (401, 403):
        return (f"{what}: it requires credentials. Export MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD, for this command (and in the env_vars of a Ray job)")
    return (f"{what}. Check that {uri} is an MLflow tracking server (`rdml ui` or `mlflow server`), or point "
            "tracking.uri / MLFLOW_TRACKING_URI elsewhere, or disable tracking with --set tracking.enabled=false")


def client(uri: str) -> MlflowClient:
    """An MlflowClient bound to ``uri`` (no global tracking state is touched)."""
    from mlflow import MlflowClient

    # a fresh sqlite store announces its schema creation at INFO on every first use, and every artifact
    # download draws a progress bar: neither is news to users of rdml's commands
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (race-safe: a concurrent creator wins)."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        exp = c.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException:
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id
    except MlflowException as exc:
        raise TrackingError(f"MLflow store {uri} refused to open experiment {name!r}: {exc.message}") from None


def _artifact_location(uri: str, experiment: str) -> str | None:
    root = artifact_root(uri)
    if root is None:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in experiment)
    return str(Path(root) / safe)


def resolved_uri(tracking: TrackingConfig | str | None) -> str:
    """URI from a TrackingConfig, an explicit URI string, or the environment/default."""
    if tracking is None or isinstance(tracking, str):
        return resolve_uri(tracking)
    return resolve_uri(tracking.uri)
