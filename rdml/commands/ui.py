"""Start the MLflow UI (``mlflow server``) on the store the config points at, bound to 127.0.0.1.

The backend store is the configured tracking URI (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else ``./mlflow.db``); artifacts are served from where rdml's runs put them (``mlartifacts/`` next to
the sqlite database). If the URI already is a server URL there is nothing to start: open it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from rdml.commands.common import add_config_arguments, config_from_args
from rdml.errors import RdmlError, TrackingError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--port", type=int, default=5000, help="port of the UI (default 5000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; the UI has no authentication)")
    parser.add_argument("--dry-run", action="store_true", help="print the mlflow server command and exit")


def server_command(uri: str, host: str, port: int) -> list[str]:
    """The ``mlflow server`` command line serving the sqlite store ``uri``."""
    from rdml.tracking import artifact_root

    root = artifact_root(uri)
    if root is None:
        raise TrackingError(f"rdml ui serves local sqlite stores; {uri} is not one (open it directly if it is a server)")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_bin is None:
        raise RdmlError("the `mlflow` command is not installed in this environment; pip install mlflow==3.17.2")
    return [mlflow_bin, "server", "--backend-store-uri", uri, "--artifacts-destination", root,
            "--host", host, "--port", str(port), "--workers", "1"]


def run(args: argparse.Namespace) -> int:
    from rdml.tracking import resolved_uri

    cfg = config_from_args(args)
    uri = resolved_uri(cfg.tracking)
    if uri.startswith(("http://", "https://")):
        print(f"tracking.uri is already a server: open {uri}")
        return 0
    cmd = server_command(uri, args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    Path(cmd[cmd.index("--artifacts-destination") + 1]).mkdir(parents=True, exist_ok=True)
    print(f"MLflow UI for {uri} at {url} (Ctrl-C to stop)", flush=True)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0
