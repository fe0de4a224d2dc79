"""The skips a run may end with, and the check that fails the run on any other.

A test that skips passes nothing: on a machine without one of the suite's tools
a skip would turn the run green without running the test. So a run fails, and
names the test, when a test skips for a reason not listed in ``ALLOWED``. The
list is short on purpose, and each entry says why its skip is outside what a
machine running ``make test`` can do something about. Everything else that a
test skips on is a tool or a piece of history the machine must provide:

- ``promtool`` and ``/usr/bin/chromium``: ``make test`` installs Debian's
  ``prometheus`` and ``chromium`` packages as root through ``apt-get``; where it
  cannot (not root, no network), install them yourself, or the run fails;
- ``kubectl`` (it renders ``k8s/``), ``git`` and ``tar``, and Tidings 0.1 in the
  clone's history (a full clone, not a shallow one): the upgrade and deployment
  tests need them.

``-rs`` (in pyproject.toml) lists every skip at the end of a run, allowed or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

# The name the check is registered under, for a test to find it.
PLUGIN = "tidings-skips"


@dataclass(frozen=True)
class Allowed:
    """A skip reason a run may end with: a pattern the whole reason matches, and why."""

    pattern: str
    why: str

    def matches(self, reason: str) -> bool:
        return re.fullmatch(self.pattern, reason, re.DOTALL) is not None


ALLOWED: tuple[Allowed, ...] = (
    Allowed(
        r"set TIDINGS_TEST_MONGODB_URI to a replica set to run against MongoDB",
        "opt-in: the runs against a real MongoDB replica set, which no machine has by "
        "default (docs/reliability.md); nx-27017 and the fakes run on every machine",
    ),
    Allowed(
        r"no docker client on this machine"
        r"|the docker client has no compose plugin \(.*\); it cannot be installed by make test",
        "`docker compose config -q`: the Compose plugin comes from Docker's own apt "
        "repository (Debian packages only the old docker-compose 1), which make test does "
        "not add; the same file is checked against the Compose Specification's schema "
        "on every machine",
    ),
)


def allowed(reason: str) -> bool:
    """Whether a run may end with a test skipped for ``reason``."""
    return any(entry.matches(reason) for entry in ALLOWED)


def skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The reason a skipped report gives, without pytest's ``Skipped: `` prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


class SkipCheck:
    """A pytest plugin: the run fails if a test skipped for a reason ``allowed`` refuses."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, str]] = []  # (node id, reason)

    def see(self, report: pytest.CollectReport | pytest.TestReport) -> None:
        # An expected failure is reported as skipped too; it is not a skip.
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = skip_reason(report)
            if not allowed(reason):
                self.refused.append((report.nodeid, reason))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self.see(report)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.see(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # Not a run that already failed: its own status says more.
        if self.refused and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.NO_TESTS_COLLECTED,
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.refused:
            return
        terminalreporter.section("skips not allowed (tests/skips.py)", red=True, bold=True)
        for nodeid, reason in self.refused:
            terminalreporter.line(f"{nodeid}: {reason}", red=True)
        terminalreporter.line(
            f"{len(self.refused)} test(s) skipped for a reason not in tests/skips.py ALLOWED: "
            "the run fails; provide what they need (docs/reliability.md#running-the-tests)",
            red=True,
        )


def pytest_configure(config: pytest.Config) -> None:
    """Register the check (tests/conftest.py calls this; ``-p tests.skips`` does too)."""
    config.pluginmanager.register(SkipCheck(), PLUGIN)
