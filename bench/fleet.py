"""The harness's side of ``bench.blast``: several generator processes driven as one.

Work (connections, or pairs) is split evenly over the processes, all pinned to
the load-generator core. Every process prepares its connections first; only
when all are ready does each get ``go``, so that setting up is not measured.
The run's clock starts at the earliest process's start and stops at the
latest moment the named work was done in any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.proc import LOAD_CORE, CpuMeter, pinned
from bench.servers import REPO, base_env

PREPARE_TIMEOUT = 120.0


class FleetError(RuntimeError):
    """A generator process failed to prepare or to answer."""


@dataclass
class FleetResult:
    """What all the processes reached together, and what the run cost each side."""

    mode: str
    processes: int
    totals: dict[str, int]
    errors: dict[str, int]
    started: float
    last: dict[str, float]
    ended: float
    timed_out: bool
    generator_cpu: float | None
    server_cpu: float | None
    closed_early: int = 0
    answers: list[dict[str, Any]] = field(default_factory=list)

    def rate(self, what: str) -> float | None:
        """``what`` (``acked``, ``counted``, ``stored``) per second, clocked to the last of it."""
        done = self.totals.get(what, 0)
        end = self.last.get(what) if not self.timed_out else self.ended
        if end is None or end <= self.started:
            return None
        return done / (end - self.started)

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers."""
        rates = {f"{k}_per_s": _round(self.rate(k)) for k in ("stored", "counted", "acked")}
        return {
            "mode": self.mode,
            "generator_processes": self.processes,
            **self.totals,
            "errors": self.errors,
            **rates,
            "elapsed_s": round(self.ended - self.started, 3),
            "timed_out": self.timed_out,
            "closed_early": self.closed_early,
            "generator_cpu": self.generator_cpu,
            "server_cpu": self.server_cpu,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def _ask(proc: asyncio.subprocess.Process, command: dict[str, Any]) -> dict[str, Any]:
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(orjson.dumps(command) + b"\n")
    await proc.stdin.drain()
    line = await proc.stdout.readline()
    if not line:
        raise FleetError(f"generator process exited with {await proc.wait()}")
    answer: dict[str, Any] = orjson.loads(line)
    if "error" in answer:
        raise FleetError(f"generator process: {answer['error']}")
    return answer


async def run_fleet(
    *,
    mode: str,
    url: str,
    count: int,
    messages: int,
    window: int,
    tag: str,
    processes: int,
    budget: float,
    server_pids: list[int],
) -> FleetResult:
    """Drive ``count`` echo connections or pairs from ``processes`` generator processes."""
    processes = max(1, min(processes, count))
    shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _ in shares:
            procs.append(
                await asyncio.create_subprocess_exec(
                    *pinned([sys.executable, "-m", "bench.blast"], LOAD_CORE),
                    cwd=REPO,
                    env=base_env(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        async with asyncio.timeout(PREPARE_TIMEOUT):
            await asyncio.gather(
                *(
                    _ask(
                        proc,
                        {
                            "cmd": "prepare",
                            "mode": mode,
                            "url": url,
                            "count": share,
                            "messages": messages,
                            "window": window,
                            "tag": f"{tag}p{index}",
                        },
                    )
                    for index, (proc, share) in enumerate(zip(procs, shares, strict=True))
                )
            )
        meters = [CpuMeter(pid) for pid in server_pids]
        for meter in meters:
            meter.start()
        async with asyncio.timeout(budget + 60):
            answers = await asyncio.gather(
                *(_ask(proc, {"cmd": "go", "budget": budget}) for proc in procs)
            )
        shares_used = [meter.stop() for meter in meters]
    finally:
        for proc in procs:
            # End of input ends a worker that was never told to go.
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    return _combine(mode, answers, shares_used)


def _combine(mode: str, answers: list[dict[str, Any]], server: list[float | None]) -> FleetResult:
    keys = ("expected", "stored", "received", "acked", "counted", "failed", "duplicates")
    totals = {k: sum(int(a[k]) for a in answers) for k in keys}
    errors: dict[str, int] = {}
    for answer in answers:
        for code, n in answer["errors"].items():
            errors[code] = errors.get(code, 0) + n
    started = min(a["started"] for a in answers)
    ended = max(a["ended"] for a in answers)
    last: dict[str, float] = {}
    for answer in answers:
        for what, at in answer["last"].items():
            last[what] = max(last.get(what, at), at)
    wall = ended - started
    generator = sum(a["cpu_s"] for a in answers) / wall if wall > 0 else None
    present = [s for s in server if s is not None]
    return FleetResult(
        mode=mode,
        processes=len(answers),
        totals=totals,
        errors=errors,
        started=started,
        last=last,
        ended=ended,
        timed_out=any(a["timed_out"] for a in answers),
        generator_cpu=None if generator is None else round(generator, 3),
        server_cpu=round(sum(present), 3) if present else None,
        closed_early=sum(int(a["closed_early"]) for a in answers),
        answers=answers,
    )
