"""The check that fails a run on a skip not allowed in tests/skips.py, run on tiny suites.

Each suite runs in a pytest process of its own, with the check loaded as the
suite loads it and nothing else, so the check cannot stop working unseen.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import skips

REPOSITORY = Path(__file__).resolve().parent.parent
MONGODB = "set TIDINGS_TEST_MONGODB_URI to a replica set to run against MongoDB"


def run(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """Run the test file ``source`` under pytest with the check; its result."""
    (tmp_path / "test_tiny.py").write_text(textwrap.dedent(source))
    environment = {
        **{name: value for name, value in os.environ.items() if name != "PYTEST_ADDOPTS"},
        "PYTHONPATH": str(REPOSITORY),
        # Only pytest and the check: not the plugins installed in the venv.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.skips", "-p", "no:cacheprovider", "-rs"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_suite_runs_with_the_check(request: pytest.FixtureRequest) -> None:
    assert isinstance(request.config.pluginmanager.get_plugin(skips.PLUGIN), skips.SkipCheck)


def test_a_run_with_only_allowed_skips_passes(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        f"""
        import pytest

        def test_runs():
            pass

        def test_opt_in():
            pytest.skip({MONGODB!r})

        @pytest.mark.xfail(reason="an expected failure is not a skip", strict=True)
        def test_expected_to_fail():
            assert False
        """,
    )
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr
    assert "1 passed, 1 skipped, 1 xfailed" in result.stdout
    assert MONGODB in result.stdout  # -rs: listed all the same
    assert "skips not allowed" not in result.stdout


def test_a_skip_for_any_other_reason_fails_the_run_and_is_named(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        f"""
        import pytest

        def test_runs():
            pass

        def test_opt_in():
            pytest.skip({MONGODB!r})

        def test_in_the_body():
            pytest.skip("kubectl is not installed")

        @pytest.mark.skipif(True, reason="promtool is not installed")
        def test_by_marker():
            pass

        @pytest.fixture
        def chromium():
            pytest.skip("/usr/bin/chromium not found")

        def test_in_a_fixture(chromium):
            pass
        """,
    )
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "skips not allowed (tests/skips.py)" in result.stdout
    summary = result.stdout.split("skips not allowed (tests/skips.py)")[1]
    assert "test_tiny.py::test_in_the_body: kubectl is not installed" in summary
    assert "test_tiny.py::test_by_marker: promtool is not installed" in summary
    assert "test_tiny.py::test_in_a_fixture: /usr/bin/chromium not found" in summary
    assert "test_opt_in" not in summary
    assert "3 test(s) skipped for a reason not in tests/skips.py ALLOWED" in summary


def test_a_module_skipped_at_collection_fails_the_run(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        """
        import pytest

        pytest.skip("git is not installed", allow_module_level=True)
        """,
    )
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "test_tiny.py: git is not installed" in result.stdout


def test_a_failing_run_keeps_its_own_exit_status(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        """
        import pytest

        def test_fails():
            assert False

        def test_skips():
            pytest.skip("kubectl is not installed")
        """,
    )
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "test_tiny.py::test_skips: kubectl is not installed" in result.stdout


@pytest.mark.parametrize(
    "reason",
    [
        MONGODB,
        "no docker client on this machine",
        "the docker client has no compose plugin (docker: unknown command: docker compose);"
        " it cannot be installed by make test",
    ],
)
def test_the_allowed_reasons(reason: str) -> None:
    assert skips.allowed(reason)


@pytest.mark.parametrize(
    "reason",
    [
        # make test installs these as root through apt-get; elsewhere, install them.
        "promtool is not installed",
        "/usr/bin/chromium not found: install Debian's chromium package "
        "(make test does, as root through apt-get)",
        # The machine must have these; a CI machine without them must not pass.
        "kubectl is not installed: it renders k8s/ (kustomize)",
        "git and tar are needed to extract Tidings 0.1",
        "commit f6d435d (Tidings 0.1) is not in this clone's history (a shallow clone?): ...",
        "could not extract Tidings 0.1: ...",
        # An allowed reason with more around it is not the same reason.
        MONGODB + ", or anything else",
        "unconditional skip",
    ],
)
def test_every_other_reason_is_refused(reason: str) -> None:
    assert not skips.allowed(reason)
