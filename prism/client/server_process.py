"""A `prism serve` in a child process, for clients that start their own server (the demo,
real sweeps, tests): start it on a port, wait until it answers /health, stop it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, port: int, log=sys.stderr) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prism.cli", "serve", "--config", config, "--port", str(port)],
        stdout=log, stderr=log,
    )


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy in time")


def stop_server(proc: subprocess.Popen, timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin_state(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/admin/state", timeout=5) as r:
        return json.loads(r.read())
