"""Process helpers shared by the stages that start workers (training ranks, extraction blocks, sweep jobs)."""

from __future__ import annotations

import ctypes
import signal
import socket
import sys


def die_with_parent() -> None:
    """Linux: this process is killed when its parent dies (``PR_SET_PDEATHSIG``), so a killed launcher
    leaves no ranks or jobs running on that would race the rerun that resumes them. Call it in a child."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a local process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
