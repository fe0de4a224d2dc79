"""Facts about processes: free ports, CPU pinning, file limits, RSS and CPU time."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

# The machine has two cores: the server side (Tidings, or the bare baseline that
# takes its seat, and the database) runs on one, the load generator on the other.
SERVER_CORE = 0
LOAD_CORE = 1

# The connection figures need more descriptors than the usual soft limit of 1024.
WANTED_FILES = 20_000

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_nofile_limit(wanted: int = WANTED_FILES) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted``; return the new soft limit.

    Children inherit it, which is how the servers get it as well (each server
    runner also calls this itself, in case it is started by hand).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def online_cpus() -> set[int]:
    """The machine's online CPUs (not this process's affinity, which may be one core)."""
    try:
        text = Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return set(range(os.cpu_count() or 1))
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def can_pin() -> bool:
    """True when taskset exists and the machine has both cores the plan uses."""
    return shutil.which("taskset") is not None and {SERVER_CORE, LOAD_CORE} <= online_cpus()


def pinned(argv: Sequence[str], core: int) -> list[str]:
    """``argv`` under ``taskset -c core`` when pinning is possible, else unchanged."""
    taskset = shutil.which("taskset")
    if taskset is None or not can_pin():
        return list(argv)
    return [taskset, "-c", str(core), *argv]


def rss_kib(pid: int) -> int | None:
    """The resident set size of ``pid`` in KiB (VmRSS), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds that ``pid`` has used, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields follow the last ')'.
    fields = stat.rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLOCK_TICKS


class CpuMeter:
    """Share of one core that a process used between ``start`` and ``stop``."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._cpu0: float | None = None
        self._wall0 = 0.0

    def start(self) -> None:
        self._cpu0 = cpu_seconds(self._pid)
        self._wall0 = _now()

    def stop(self) -> float | None:
        """The fraction of one core used since ``start`` (1.0 = a whole core), or None."""
        cpu1 = cpu_seconds(self._pid)
        wall = _now() - self._wall0
        if self._cpu0 is None or cpu1 is None or wall <= 0:
            return None
        return round((cpu1 - self._cpu0) / wall, 3)


def _now() -> float:
    return time.monotonic()
