"""How much each figure does, and how long it may take: one place for every count and bound.

``Plan()`` is the full run behind the published table (about 7 minutes on the
2-core machine with a fast Tidings, about 16 when every bound is hit);
``Plan.quick()`` is a smoke run of a minute or two for developing the harness.
Any field can be overridden from the command line:
``python -m bench m1 --set m1_repeats=1``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """Counts, loads and time bounds of every figure (seconds unless named otherwise)."""

    # M1 throughput: pairs, messages per sender, in-flight window per sender.
    # Echo connections round-trip more frames each, so that an echo run lasts
    # seconds too: both rates are taken over a steady stretch, not a start-up.
    m1_pairs: int = 20
    m1_messages: int = 1000
    m1_echo_messages: int = 10000
    m1_window: int = 64
    m1_repeats: int = 7
    m1_budget: float = 45.0
    # Load-generator processes (bench.blast) driving each server, all on the
    # load core; a run where the server used less than 0.9 of its core is incomplete.
    m1_generators: int = 2

    # Flat inbox: preload target and its time bound, then the measured operations.
    flat_preload: int = 100_000
    flat_pending: int = 100
    flat_preload_senders: int = 4
    # The embedded store can take 100,000 within the bound; nx-27017 cannot.
    flat_preload_budget: float = 150.0
    flat_preload_budget_nx: float = 60.0
    # Messages sent, then acked, to each inbox. On the embedded store 200 took
    # 20 ms, a window one garbage collection of the 100,000 could fill alone.
    flat_sends: int = 2_000
    flat_sends_nx: int = 200
    # Alternating flat/empty rounds of those sends on the embedded store (median).
    flat_rounds: int = 3
    flat_identifies: int = 10
    flat_window: int = 64
    flat_budget: float = 60.0

    # M2 store path on nx-27017: senders (= bare insert tasks) and messages each.
    m2_senders: int = 8
    m2_messages: int = 100
    m2_window: int = 16
    m2_budget: float = 60.0

    # M3 latency on nx-27017: pairs and the fixed offered load.
    # A load nx-27017 sustains with Tidings on it (it saturates below 100 msgs/s
    # with 20 pairs): latency under a queue that grows measures the queue.
    m3_pairs: int = 4
    m3_rate: float = 20.0
    m3_duration: float = 10.0

    # M4 fan-out on the embedded store: idle users, and the fixed load beside them.
    m4_pairs: int = 10
    m4_rate: float = 50.0
    m4_duration: float = 10.0
    m4_idle_few: int = 10
    m4_idle_many: int = 1000
    m4_idle_budget: float = 90.0

    # M5 memory: connections measured, connections held, per load-generator process.
    m5_connections: int = 5000
    m5_hold: int = 15_000
    m5_per_worker: int = 5000
    m5_budget: float = 90.0
    m5_hold_budget: float = 45.0

    # M6 database commands on nx-27017. Burst: every sender's messages in flight at
    # once, so that writes batch. Steady: open loop, slow enough that each message
    # is written, delivered and acknowledged before the next is sent (nx-27017
    # takes 50 to 200 ms for that here), so that no batch can form.
    m6_pairs: int = 8
    m6_messages: int = 25
    m6_budget: float = 60.0
    m6_steady_rate: float = 4.0
    m6_steady_duration: float = 15.0

    # Latency against offered load, for the plot: 20 pairs, rising load.
    sweep_pairs: int = 20
    sweep_rates: tuple[float, ...] = (100.0, 300.0, 1000.0, 2000.0, 3000.0)
    # nx-27017 saturates far lower; its own steps.
    sweep_rates_nx: tuple[float, ...] = (10.0, 20.0, 40.0, 80.0)
    sweep_duration: float = 5.0

    # How long a run waits for the last messages after the load stopped.
    drain: float = 20.0

    @classmethod
    def quick(cls) -> Plan:
        """A small run, for developing the harness; its figures mean little."""
        return cls(
            m1_pairs=4,
            m1_messages=40,
            m1_echo_messages=200,
            m1_repeats=1,
            m1_budget=20.0,
            flat_preload=500,
            flat_preload_budget=15.0,
            flat_preload_budget_nx=15.0,
            flat_sends=40,
            flat_sends_nx=40,
            flat_rounds=1,
            flat_identifies=3,
            m2_senders=4,
            m2_messages=20,
            m3_pairs=4,
            m3_rate=20.0,
            m3_duration=3.0,
            m4_pairs=4,
            m4_rate=20.0,
            m4_duration=3.0,
            m4_idle_many=100,
            m5_connections=300,
            m5_hold=600,
            m5_per_worker=300,
            m5_budget=30.0,
            m5_hold_budget=20.0,
            m6_pairs=4,
            m6_messages=10,
            m6_steady_duration=3.0,
            sweep_pairs=4,
            sweep_rates=(20.0, 60.0),
            sweep_rates_nx=(10.0, 20.0),
            sweep_duration=2.0,
            drain=8.0,
        )

    def with_overrides(self, pairs: list[str]) -> Plan:
        """This plan with ``name=value`` overrides, each parsed as its field's type."""
        changes: dict[str, object] = {}
        fields = {f.name: f for f in dataclasses.fields(self)}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep or name not in fields:
                raise ValueError(
                    f"--set {pair!r}: expected NAME=VALUE with NAME one of {sorted(fields)}"
                )
            current = getattr(self, name)
            if isinstance(current, tuple):
                changes[name] = tuple(float(v) for v in text.split(",") if v)
            elif isinstance(current, bool):
                changes[name] = text.lower() in {"1", "true", "yes"}
            else:
                changes[name] = type(current)(text)
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
