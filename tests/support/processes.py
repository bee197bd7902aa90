"""Servers the tests start in their own process (the app, vLLM, a Space bundle): a free port,
waiting until one answers, and stopping it with whatever it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A loopback port nothing listens on now (also torchrun's master port: its port 0 hangs
    the gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, seconds: float = 150,
                  interval: float = 0.5) -> None:
    """Return once GET `url` answers 200; fail with the end of `log` when `proc` exits first or
    nothing answers within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n"
                                 f"{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise AssertionError(f"{url} did not answer in {seconds} s:\n{log.read_text()[-3000:]}")


def wait_for_line(proc: subprocess.Popen, needle: str, seconds: float = 150) -> str:
    """Read `proc`'s text stdout until a line holds `needle` (or it exits, or `seconds` pass);
    returns what was read, which holds `needle` when it came."""
    lines, deadline = [], time.time() + seconds
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if needle in line:
            break
    return "".join(lines)


def stop(proc: subprocess.Popen, seconds: float = 20) -> None:
    """Stop `proc` (and, when it leads a session of its own, everything it started): SIGTERM,
    then SIGKILL after `seconds`."""
    if proc.poll() is not None:
        return
    try:
        own_group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:  # exited meanwhile
        return

    def send(sig: int) -> None:
        try:
            if own_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:  # gone meanwhile
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(10)
