"""The local Ray that rdml starts (rdml.distributed.connect) listens on 127.0.0.1 only.

A real Ray is started in a child process by `connect()` (dashboard on, as `rdml train` starts it), runs
a task and an actor, and the listening TCP sockets of that process and all its descendants (GCS,
raylet, dashboard, agents, workers) are read from /proc: every one must be on a loopback address.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import sys, ray
from rdml.config import build_config
from rdml.distributed.connect import connect

assert connect(build_config({"ray": {"num_cpus": 2}}), include_dashboard=True)

@ray.remote
def task():
    return 1

@ray.remote
class Actor:
    def ping(self):
        return "pong"

actor = Actor.remote()
assert ray.get(task.remote()) == 1 and ray.get(actor.ping.remote()) == "pong"
print("ready", flush=True)
sys.stdin.readline()  # the test reads the sockets now
ray.shutdown()
"""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(pid: int) -> list[int]:
    kids, out, stack = _children(), [pid], [pid]
    while stack:
        for child in kids.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _address(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    # /proc/net/tcp6: four 32-bit words, each in host (little-endian) order
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening_sockets() -> dict[str, tuple[str, int]]:
    """``{inode: (address, port)}`` of every listening TCP socket of this machine (``ss -ltn``)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            out[fields[9]] = (str(_address(hex_ip)), int(hex_port, 16))
    return out


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_address_parsing():
    assert str(_address("0100007F")) == "127.0.0.1" and str(_address("00000000")) == "0.0.0.0"
    assert is_loopback(str(_address("0000000000000000FFFF00000100007F")))  # ::ffff:127.0.0.1
    assert not is_loopback(str(_address("00000000000000000000000000000000")))  # :: (every interface)
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.2")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_local_ray_listens_on_loopback_only(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        line = proc.stdout.readline()
        while line and "ready" not in line:
            line = proc.stdout.readline()
        assert "ready" in line, proc.communicate(timeout=60)[0][-3000:]
        time.sleep(3)  # let the agents finish binding
        sockets = listening_sockets()
        found = []
        for pid in process_tree(proc.pid):
            try:
                name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            found += [(pid, Path(name).name, *sockets[i]) for i in _socket_inodes(pid) if i in sockets]
        names = {name for _, name, _, _ in found}
        assert len(found) >= 5 and "gcs_server" in names and "raylet" in names, found  # the check saw Ray's ports
        exposed = [f for f in found if not is_loopback(f[2])]
        assert not exposed, f"Ray ports listening beyond loopback: {exposed}"
    finally:
        if proc.poll() is None:
            proc.stdin.write("\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
