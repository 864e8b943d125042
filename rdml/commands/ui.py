"""Start the MLflow UI and tracking server (``mlflow server``) on the store the config points at.

The backend store is the configured tracking URI (``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else ``./mlflow.db``); artifacts are served from where rdml's runs put them (``mlartifacts/`` next to
the sqlite database). If the URI already is a server URL there is nothing to start: open it.

Examples::

    rdml ui                                              # http://127.0.0.1:5000, this machine only
    rdml ui --host 0.0.0.0 --port 5000 --allowed-hosts mlflow.internal,10.0.0.5
    rdml ui --host 0.0.0.0 --allowed-hosts mlflow.internal --cors-allowed-origins https://notebooks.internal

On a cluster (``--host 0.0.0.0``) MLflow's security middleware still refuses every request whose
``Host`` header is not localhost or a private IP (``403 Invalid Host header``): name the host names
clients use with ``--allowed-hosts`` (added to those defaults; a name without a port is also allowed
with ``:PORT``, the form browsers and clients send).
The server has no authentication: keep it on a private network (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rdml.commands.common import add_config_arguments, config_from_args
from rdml.errors import RdmlError, TrackingError

#: seconds `rdml ui` waits for the server's /health before giving up (a cold start takes ~15-40 s)
STARTUP_TIMEOUT_S = 180.0


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1-65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--port", type=port_number, default=5000, help="port of the UI, 1-65535 (default 5000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; 0.0.0.0 for a cluster: the server has no "
                             "authentication, keep it on a private network)")
    parser.add_argument("--allowed-hosts", default=None, metavar="HOSTS",
                        help="comma-separated Host names clients may use besides localhost and private IPs "
                             "(mlflow server --allowed-hosts). A name without a port is allowed on --port too; "
                             "wildcards like 'app-*.internal' work, '*' allows all")
    parser.add_argument("--cors-allowed-origins", default=None, metavar="ORIGINS",
                        help="comma-separated browser origins allowed to call the API (mlflow server "
                             "--cors-allowed-origins; default: localhost origins)")
    parser.add_argument("--x-frame-options", default=None, choices=["SAMEORIGIN", "DENY", "NONE"],
                        help="X-Frame-Options header of the UI (mlflow server --x-frame-options)")
    parser.add_argument("--disable-security-middleware", action="store_true",
                        help="DANGEROUS: no Host/CORS validation at all (mlflow server's option; testing only)")
    parser.add_argument("--dry-run", action="store_true", help="print the mlflow server command and exit")


#: MLflow 3.17's default allowed Host headers (localhost on any port, private IPv4/IPv6 ranges); an
#: explicit --allowed-hosts replaces them in mlflow server, `rdml ui` adds the user's names to them
DEFAULT_ALLOWED_HOSTS = ("localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*", "[::1]", "[[]::1]:*",
                         "192.168.*", "10.*", *(f"172.{i}.*" for i in range(16, 32)), "fc00:*", "fd00:*")


def expand_allowed_hosts(hosts: str, port: int) -> str:
    """MLflow's defaults plus each name as given and as ``name:PORT`` (the Host header carries the port)."""
    out: list[str] = []
    for raw in hosts.split(","):
        host = raw.strip()
        if not host:
            continue
        out.append(host)
        has_port = host.startswith("[") and "]:" in host or (not host.startswith("[") and ":" in host)
        if "*" not in host and not has_port:
            out.append(f"{host}:{port}")
    if not out:
        raise RdmlError("--allowed-hosts is empty; pass host names such as --allowed-hosts mlflow.internal,10.0.0.5")
    return ",".join(dict.fromkeys([*out, *DEFAULT_ALLOWED_HOSTS]))


def server_command(uri: str, host: str, port: int, *, allowed_hosts: str | None = None,
                   cors_allowed_origins: str | None = None, x_frame_options: str | None = None,
                   disable_security_middleware: bool = False) -> list[str]:
    """The ``mlflow server`` command line serving the sqlite store ``uri``."""
    from rdml.tracking import artifact_root

    root = artifact_root(uri)
    if root is None:
        raise TrackingError(f"rdml ui serves local sqlite stores; {uri} is not one (open it directly if it is a server)")
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_bin is None:
        from rdml.extras import MissingExtraError, message

        raise MissingExtraError(message("mlflow"))
    cmd = [mlflow_bin, "server", "--backend-store-uri", uri, "--artifacts-destination", root,
           "--host", host, "--port", str(port), "--workers", "1"]
    if allowed_hosts:
        cmd += ["--allowed-hosts", expand_allowed_hosts(allowed_hosts, port)]
    if cors_allowed_origins:
        cmd += ["--cors-allowed-origins", cors_allowed_origins]
    if x_frame_options:
        cmd += ["--x-frame-options", x_frame_options]
    if disable_security_middleware:
        cmd.append("--disable-security-middleware")
    return cmd


def check_port_free(host: str, port: int) -> None:
    """RdmlError if ``host:port`` cannot be bound (mlflow server would log the error and exit 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise RdmlError(f"port {port} on {host} is already in use (another `rdml ui` or MLflow server?); "
                                f"stop it or pick a free port with --port") from None
            raise RdmlError(f"cannot listen on {host}:{port} ({exc.strerror}); pass an address of this machine "
                            "with --host (127.0.0.1, 0.0.0.0) and a free --port") from None


def _local_url(host: str, port: int) -> str:
    """A URL that reaches the server from this machine (0.0.0.0 and :: are bind-all addresses)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RdmlError(f"mlflow server exited with status {proc.returncode} before answering on {url} "
                            "(its messages are above); fix the cause and rerun `rdml ui`")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RdmlError(f"mlflow server did not answer on {url}/health within {timeout:.0f} s; see its messages above")


class _Stop(Exception):
    """SIGINT or SIGTERM asked `rdml ui` to stop the server."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _stop_server(proc: subprocess.Popen) -> None:
    """TERM the server's process group (mlflow server and its workers), KILL it if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def run(args: argparse.Namespace) -> int:
    from rdml.tracking import resolved_uri

    cfg = config_from_args(args)
    uri = resolved_uri(cfg.tracking)
    if uri.startswith(("http://", "https://")):
        print(f"tracking.uri is already a server: open {uri}")
        return 0
    cmd = server_command(uri, args.host, args.port, allowed_hosts=args.allowed_hosts,
                         cors_allowed_origins=args.cors_allowed_origins, x_frame_options=args.x_frame_options,
                         disable_security_middleware=args.disable_security_middleware)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    check_port_free(args.host, args.port)
    Path(cmd[cmd.index("--artifacts-destination") + 1]).mkdir(parents=True, exist_ok=True)
    url = _local_url(args.host, args.port)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    # its own session: Ctrl-C reaches only this process, which then stops the server's whole group
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        _wait_healthy(proc, url, STARTUP_TIMEOUT_S)
        where = url
        if args.host in ("0.0.0.0", "::"):
            where += (f" and http://{socket.gethostname()}:{args.port} (all interfaces; Host names allowed: "
                      f"{args.allowed_hosts or 'localhost and private IPs, add --allowed-hosts NAME'})")
        print(f"MLflow UI for {uri} at {where} (Ctrl-C to stop)", flush=True)
        code = proc.wait()
        if code != 0:
            raise RdmlError(f"mlflow server exited with status {code} (its messages are above)")
        return 0
    except _Stop as stop:
        _ignore_signals()  # a second Ctrl-C must not interrupt the shutdown with a traceback
        _stop_server(proc)
        print(f"rdml ui: stopped the MLflow server ({signal.Signals(stop.args[0]).name})", file=sys.stderr)
        return 0
    finally:
        _ignore_signals()
        _stop_server(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _ignore_signals() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
