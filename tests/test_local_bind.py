"""The app is local by default: ``make app`` (and a bare ``streamlit run app.py``, through
``.streamlit/config.toml``) listens on 127.0.0.1 only, read from the kernel's socket list."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(180)

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses of every socket listening on TCP ``port`` (IPv4 and IPv6), from
    /proc/net/tcp and /proc/net/tcp6: e.g. ``{"127.0.0.1"}``, ``{"0.0.0.0", "::"}``."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, raw))
    return found


def _started(command: list[str], port: int, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "ISLE_CACHE_DIR": str(tmp_path / "cache"), "ISLE_WORKER": "off"}
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return server
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, f"{command} did not serve"
            time.sleep(0.3)


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.parametrize("how", ["make app", "streamlit run app.py"])
def test_the_app_listens_on_loopback_only(how, tmp_path):
    port = _free_port()
    command = (["make", "-s", "app", f"PORT={port}"] if how == "make app" else
               [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)])
    server = _started(command, port, tmp_path)
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        _stop(server)


def test_the_socket_list_reader_sees_an_all_interfaces_listener():
    """The check above could pass by reading nothing: a socket on every interface is seen as such."""
    with socket.socket() as everywhere, socket.socket() as loopback:
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        assert listening_addresses(everywhere.getsockname()[1]) == {"0.0.0.0"}
        assert listening_addresses(loopback.getsockname()[1]) == {"127.0.0.1"}
