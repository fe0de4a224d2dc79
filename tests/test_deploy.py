"""The deployment files, checked offline: Dockerfile, docker-compose.yml and k8s/.

No machine that develops Tidings can build an image or reach a cluster (no
Docker engine, loopback only), so these tests check what can be checked
without one (docs/operations.md):

- the Dockerfile passes hadolint, and its final stage has what hadolint does
  not check (a non-root numeric USER, a HEALTHCHECK, the OCI labels, no build
  tools, the settings an image needs);
- the build stage's RUN steps, replayed in a fresh venv in a temporary
  directory, really install Tidings, and its console script serves: /healthz,
  and the image's own HEALTHCHECK command, answer;
- docker-compose.yml is valid under the Compose Specification's JSON schema
  (tests/data/compose-spec.json) and says what the stack needs;
- ``kubectl kustomize k8s/`` renders, kubernetes-validate --strict accepts every
  object, and the facts that span files hold: probe paths are the app's, the
  grace period covers preStop and the drain, the pods are non-root with a
  read-only root filesystem, the Ingress outlives the ping interval, and every
  TIDINGS_* name is a real setting.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from starlette.routing import BaseRoute

from tests.helpers import TIMEOUT, free_port
from tests.processes import server_environment, wait_until_ready
from tidings.app import create_app
from tidings.auth import MIN_SECRET_BYTES
from tidings.config import Settings

REPOSITORY = Path(__file__).resolve().parents[1]
DOCKERFILE = REPOSITORY / "Dockerfile"
COMPOSE = REPOSITORY / "docker-compose.yml"
COMPOSE_SCHEMA = REPOSITORY / "tests" / "data" / "compose-spec.json"
KUSTOMIZATION = REPOSITORY / "k8s"
PYPROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())

# The oldest Kubernetes the manifests are written for, and the newest that
# kubernetes-validate ships schemas for: an API removed in between fails one.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# docs/benchmarks.md, M5: server memory per idle identified connection.
KIB_PER_CONNECTION = 31
# Packages that only building native code needs: none may reach the image.
BUILD_TOOLS = re.compile(r"(^|\s)(gcc|g\+\+|clang|build-essential|make|cargo|rustc|\S+-dev)(\s|$)")
OCI_LABELS = ("title", "description", "version", "revision", "licenses")
# Where a tool writes when it is asked to write anything at run time.
RUN_TIME_WRITABLE = "/tmp"  # noqa: S108 (a path inside the image, not a file made here)

Document = dict[str, Any]


def tidings_names() -> set[str]:
    """Every ``TIDINGS_*`` variable Tidings reads."""
    return {f"TIDINGS_{name.upper()}" for name in Settings.model_fields}


def app_paths() -> set[str]:
    """The HTTP and WebSocket paths the app serves."""
    routes: list[BaseRoute] = create_app(Settings(dev=True)).routes
    return {str(getattr(route, "path", "")) for route in routes}


def seconds(value: str) -> float:
    """A Compose duration (``35s``, ``1m30s``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert "".join(n + u for n, u in parts) == value, f"not a duration: {value}"
    return sum(float(number) * units[unit] for number, unit in parts)


# --- The Dockerfile --------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, its continuation lines joined."""

    keyword: str
    arguments: str

    def flags(self) -> tuple[dict[str, str], str]:
        """The leading ``--name=value`` flags (``RUN --mount``, ``COPY --from``), and the rest."""
        found: dict[str, str] = {}
        rest = self.arguments
        while match := re.match(r"--([a-z-]+)(?:=(\S*))?\s+", rest):
            found[match[1]] = match[2] or ""
            rest = rest[match.end() :]
        return found, rest

    def pairs(self) -> dict[str, str]:
        """``ENV``/``LABEL``/``ARG`` arguments as ``key=value`` pairs, quotes removed."""
        return dict(token.partition("=")[::2] for token in shlex.split(self.arguments))

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (``CMD ["serve"]``)."""
        arguments = self.arguments
        if self.keyword == "HEALTHCHECK":
            arguments = arguments[arguments.index(" CMD ") + len(" CMD ") :]
        value = json.loads(arguments)
        assert isinstance(value, list), f"{self.keyword} is not in exec form"
        return [str(item) for item in value]


@dataclass
class Stage:
    """One ``FROM`` and the instructions up to the next."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """This stage's instructions of one kind, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        """The last instruction of a kind (the one Docker keeps)."""
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]

    def env(self) -> dict[str, str]:
        """The stage's ``ENV`` variables, later ones winning."""
        merged: dict[str, str] = {}
        for instruction in self.all("ENV"):
            merged.update(instruction.pairs())
        return merged


@dataclass
class Dockerfile:
    """A Dockerfile parsed into its global ``ARG`` defaults and its stages."""

    global_args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        """Parse ``text``: comments dropped, continuations joined, stages split at ``FROM``."""
        global_args: dict[str, str] = {}
        stages: list[Stage] = []
        for line in _logical_lines(text):
            keyword, _, arguments = line.partition(" ")
            instruction = Instruction(keyword.upper(), arguments.strip())
            if instruction.keyword == "FROM":
                base, *alias = shlex.split(instruction.arguments)
                for name, default in global_args.items():
                    base = base.replace("${" + name + "}", default)
                stages.append(Stage(base, alias[1] if alias else None))
            elif not stages:
                assert instruction.keyword == "ARG", f"{keyword} before the first FROM"
                global_args.update(instruction.pairs())
            else:
                stages[-1].instructions.append(instruction)
        return cls(global_args, stages)

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise AssertionError(f"no stage {name}")


def _logical_lines(text: str) -> Iterator[str]:
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        # Docker drops comment and blank lines, inside a continuation too.
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    """The repository's Dockerfile, parsed."""
    return Dockerfile.parse(DOCKERFILE.read_text())


def tool(name: str) -> str:
    """A dev dependency's executable, next to this interpreter (or on PATH)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is missing: `make test` installs it from the dev extras"
    return found


def test_hadolint_passes_with_the_oci_labels_required() -> None:
    hadolint = tool("hadolint")
    labels = [f"org.opencontainers.image.{label}:text" for label in OCI_LABELS]
    labels[OCI_LABELS.index("licenses")] = "org.opencontainers.image.licenses:spdx"
    command = [hadolint, "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma"]
    for label in labels:
        command += ["--require-label", label]
    result = subprocess.run(
        [*command, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_final_stage_is_a_fresh_slim_python_that_runs_as_non_root(
    dockerfile: Dockerfile,
) -> None:
    build, final = dockerfile.stage("build"), dockerfile.stages[-1]
    python = PYPROJECT["tool"]["mypy"]["python_version"]
    for stage in (build, final):
        assert re.fullmatch(rf"python:{re.escape(python)}(\.\d+)?-slim(-\w+)?", stage.base), (
            f"{stage.base}: the project's Python, slim, pinned by tag"
        )
    # Not FROM the build stage: nothing of it but the venv may reach the image.
    assert final.base not in {stage.name for stage in dockerfile.stages}
    user = final.one("USER").arguments
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER {user}: numeric, not root"
    # USER comes before the instructions that define how the container runs.
    keywords = [i.keyword for i in final.instructions]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_the_final_stage_has_no_build_tools_and_only_the_venv(dockerfile: Dockerfile) -> None:
    build, final = dockerfile.stage("build"), dockerfile.stages[-1]
    for instruction in final.all("RUN"):
        command = instruction.arguments
        assert not re.search(r"\b(apt-get|apt|apk|dnf|yum|pip)\b.*\binstall\b", command), command
        assert not BUILD_TOOLS.search(command), command
    copies = [instruction.flags() for instruction in final.all("COPY")]
    venv = build.env()["VIRTUAL_ENV"]
    assert copies == [({"from": "build"}, f"{venv} {venv}")], (
        "the final stage copies the build stage's venv, to the same path (the console "
        "scripts' shebangs name it), and nothing else"
    )
    assert not final.all("ADD")


def test_the_image_is_configured_for_a_container(dockerfile: Dockerfile) -> None:
    final = dockerfile.stages[-1]
    env = final.env()
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["TIDINGS_HOST"] == "0.0.0.0"  # noqa: S104 (the image's, checked)
    assert env["HOME"] == env["TMPDIR"] == RUN_TIME_WRITABLE
    assert {name for name in env if name.startswith("TIDINGS_")} <= tidings_names()
    assert final.one("EXPOSE").arguments == env["TIDINGS_PORT"]
    assert env["PATH"].startswith(f"{env['VIRTUAL_ENV']}/bin:")
    assert final.one("ENTRYPOINT").exec_form() == ["tidings"]
    assert PYPROJECT["project"]["scripts"]["tidings"] == "tidings.cli:main"
    assert final.one("CMD").exec_form() == ["serve"]


def test_the_image_has_a_healthcheck_on_healthz_and_the_oci_labels(
    dockerfile: Dockerfile,
) -> None:
    final = dockerfile.stages[-1]
    check = final.one("HEALTHCHECK")
    command = check.exec_form()
    assert command[:2] == ["python", "-c"], "no curl in a slim image"
    assert "/healthz" in command[2]
    assert "/healthz" in app_paths()
    labels = {}
    for instruction in final.all("LABEL"):
        labels.update(instruction.pairs())
    args = {}
    for instruction in final.all("ARG"):
        args.update(instruction.pairs())
    for label in OCI_LABELS:
        assert labels.get(f"org.opencontainers.image.{label}"), f"no {label} label"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]


def test_dockerignore_lets_in_exactly_what_the_build_copies(dockerfile: Dockerfile) -> None:
    lines = [
        line
        for line in (REPOSITORY / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything out first, so that nothing leaks in by default"
    let_in = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied: set[str] = set()
    for instruction in dockerfile.stage("build").all("COPY"):
        *sources, _ = shlex.split(instruction.flags()[1])
        copied.update(source.rstrip("/") for source in sources)
    assert copied == let_in


# --- The build stage, replayed ----------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    """The build stage's result, on this machine: the venv, and ``/`` as the replay mapped it."""

    root: Path
    venv: Path


def _rooted(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


@pytest.fixture(scope="module")
def installed(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Run the build stage's steps as Docker would, with ``/`` mapped to a temporary directory.

    The COPY steps copy from the repository what .dockerignore lets in; the RUN
    steps run verbatim under ``/bin/sh -c`` with the stage's ENV (absolute
    paths moved under the temporary root) and this machine's ``python``, which
    is the project's Python. ``--mount=type=cache`` only keeps Docker's pip
    cache; here pip uses its own.
    """
    build = dockerfile.stage("build")
    root = tmp_path_factory.mktemp("image")
    stage_env = {
        name: str(_rooted(root, value)) if value.startswith("/") else value
        for name, value in build.env().items()
    }
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TIDINGS_") and name != "PYTHONPATH"
    }
    env.update(stage_env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    workdir = root
    ignored = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for instruction in build.instructions:
        if instruction.keyword == "WORKDIR":
            workdir = _rooted(root, instruction.arguments)
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            flags, rest = instruction.flags()
            assert not flags, "the build stage copies only from the build context"
            *sources, destination = shlex.split(rest)
            target = workdir / destination
            for source in sources:
                origin = REPOSITORY / source
                if origin.is_dir():
                    shutil.copytree(origin, target, ignore=ignored)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)
        elif instruction.keyword == "RUN":
            _, command = instruction.flags()
            # The replay rewrites no command: paths come from ENV and WORKDIR.
            for value in build.env().values():
                if value.startswith("/"):
                    assert value not in command, f"{command} names {value}: use the variable"
            result = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"
    return Installed(root, Path(stage_env["VIRTUAL_ENV"]))


def _snapshot(directory: Path, but: Path) -> dict[str, int]:
    """Every path under ``directory`` but those under ``but``, with its modification time."""
    return {
        str(path): path.lstat().st_mtime_ns
        for path in directory.rglob("*")
        if not path.is_relative_to(but)
    }


def test_the_replayed_install_holds_tidings_compiled_and_no_pip(installed: Installed) -> None:
    venv = installed.venv
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import tidings; print(tidings.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=installed.root,
        env=server_environment(None),
    ).stdout.strip()
    package = Path(located).parent
    assert package.is_relative_to(venv), f"tidings imported from {located}, not the venv"
    # Compiled at install time: the image's read-only root cannot take .pyc files later.
    assert list((package / "__pycache__").glob("app.*.pyc"))
    assert not (venv / "bin" / "pip").exists(), "the runtime venv needs no pip"


async def test_the_installed_console_script_serves_and_passes_the_healthcheck(
    dockerfile: Dockerfile, installed: Installed
) -> None:
    final = dockerfile.stages[-1]
    venv = installed.venv
    port = free_port()
    writable = installed.root / RUN_TIME_WRITABLE.lstrip("/")
    writable.mkdir()
    image_env = final.env()
    env = server_environment(
        None,
        # Loopback here; the image's 0.0.0.0 is checked above.
        host="127.0.0.1",
        port=str(port),
        jwt_secret=secrets.token_urlsafe(48),
        drain_delay="0",
        log_level="WARNING",
    )
    env.update({name: image_env[name] for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")})
    env.update(HOME=str(writable), TMPDIR=str(writable), VIRTUAL_ENV=str(venv))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    before = _snapshot(installed.root, but=writable)
    # ENTRYPOINT + CMD, as Docker joins them; "tidings" is found on the image's PATH.
    entrypoint, cmd = final.one("ENTRYPOINT").exec_form(), final.one("CMD").exec_form()
    assert shutil.which(entrypoint[0], path=env["PATH"]) == str(venv / "bin" / entrypoint[0])
    process = await asyncio.create_subprocess_exec(
        *entrypoint,
        *cmd,
        env=env,
        cwd=writable,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    # Read as it comes, so that a chatty server never blocks on a full pipe.
    stderr = asyncio.ensure_future(process.stderr.read())
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}", process)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            response = await http.get("/healthz")
            # The web console is package data: the installed wheel must carry and serve it.
            console = [await http.get(path) for path in ("/", "/console.js", "/console.css")]
        assert (response.status_code, response.text) == (200, "ok")
        assert [page.status_code for page in console] == [200, 200, 200]
        assert "<title>Tidings console</title>" in console[0].text
        assert await _healthcheck(final, env) == 0
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    log = (await asyncio.wait_for(stderr, TIMEOUT)).decode(errors="replace")
    assert process.returncode == 0, f"tidings serve exited {process.returncode}:\n{log}"
    # And the same check fails once nothing answers.
    assert await _healthcheck(final, env) != 0
    # Nothing was written at run time but under /tmp (the image's root is read-only).
    assert _snapshot(installed.root, but=writable) == before


async def _healthcheck(final: Stage, env: dict[str, str]) -> int:
    """Run the image's HEALTHCHECK command as Docker would (exec form, the image's PATH)."""
    check = await asyncio.create_subprocess_exec(
        *final.one("HEALTHCHECK").exec_form(),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(check.wait(), TIMEOUT)


# --- docker-compose.yml -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Document:
    """docker-compose.yml, loaded."""
    loaded: Document = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_file_is_valid_under_the_compose_specification(compose: Document) -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator_class(schema).iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


def test_compose_runs_mongodb_as_a_replica_set_that_initiates_itself(compose: Document) -> None:
    mongodb = compose["services"]["mongodb"]
    assert re.fullmatch(r"mongo:7(\.\d+)*", mongodb["image"]), "the official image, pinned"
    command = mongodb["command"]
    assert command[command.index("--replSet") + 1] == "rs0"
    check = " ".join(mongodb["healthcheck"]["test"])
    assert "rs.initiate" in check
    assert "isWritablePrimary" in check
    # The member is named as the Tidings container reaches it, since the driver
    # connects to the members the set names, not to the host in the URI.
    assert '"mongodb:27017"' in check
    data = [v.split(":")[0] for v in mongodb["volumes"] if v.endswith(":/data/db")]
    assert data, "MongoDB's data on a volume"
    assert data[0] in compose["volumes"], "a named volume"


def test_compose_runs_tidings_read_only_on_loopback_after_mongodb(compose: Document) -> None:
    tidings = compose["services"]["tidings"]
    assert tidings["build"]["context"] == "."
    assert tidings["build"]["dockerfile"] == DOCKERFILE.name
    assert tidings["depends_on"]["mongodb"]["condition"] == "service_healthy"
    env = tidings["environment"]
    assert set(env) <= tidings_names()
    assert "replicaSet=rs0" in env["TIDINGS_MONGODB_URI"]
    assert env["TIDINGS_MONGODB_URI"].startswith("mongodb://mongodb:27017/")
    assert env["TIDINGS_CHANGE_STREAM_SCOPE"] == "database"
    assert env["TIDINGS_JWT_SECRET"].startswith("${TIDINGS_JWT_SECRET:?")
    assert tidings["ports"]
    assert all(port.startswith("127.0.0.1:") for port in tidings["ports"])
    assert "ports" not in compose["services"]["mongodb"]
    assert tidings["read_only"] is True
    assert RUN_TIME_WRITABLE in tidings["tmpfs"]
    # Docker SIGKILLs after stop_grace_period; the drain must end before.
    deadline = Settings(drain_delay=float(env.get("TIDINGS_DRAIN_DELAY", 5))).drain_deadline
    assert seconds(tidings["stop_grace_period"]) >= deadline + 5


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or ["no output"])[0]
        pytest.skip(
            f"the docker client has no compose plugin ({said}); it cannot be installed by make test"
        )
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "TIDINGS_JWT_SECRET": secrets.token_urlsafe(48)},
    )
    assert result.returncode == 0, result.stderr


# --- k8s/ --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``kubectl kustomize k8s/``, written to a file."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders k8s/ (kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATION)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("k8s") / "rendered.yaml"
    path.write_text(result.stdout)
    return path


@pytest.fixture(scope="module")
def objects(rendered: Path) -> dict[tuple[str, str], Document]:
    """The rendered objects, by kind and name."""
    found: dict[tuple[str, str], Document] = {}
    for document in yaml.safe_load_all(rendered.read_text()):
        key = (document["kind"], document["metadata"]["name"])
        assert key not in found, f"{key} twice"
        found[key] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_validate_accepts_every_object(
    rendered: Path, objects: dict[tuple[str, str], Document], version: str
) -> None:
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"^INFO .* passed for resource (\S+) ", result.stdout, re.MULTILINE)
    assert len(passed) == len(objects), result.stdout


def test_k8s_has_every_object_the_deployment_needs(
    objects: dict[tuple[str, str], Document],
) -> None:
    expected = {
        ("Namespace", "tidings"),
        ("ConfigMap", "tidings"),
        ("Secret", "tidings"),
        ("Deployment", "tidings"),
        ("Service", "tidings"),
        ("Ingress", "tidings"),
        ("HorizontalPodAutoscaler", "tidings"),
        ("PodDisruptionBudget", "tidings"),
        ("NetworkPolicy", "tidings"),
        ("StatefulSet", "mongodb"),
        ("Service", "mongodb"),
        ("Job", "mongodb-init"),
        ("NetworkPolicy", "mongodb"),
    }
    assert set(objects) == expected
    namespaced = [o for key, o in objects.items() if key[0] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"tidings"}


def _server(objects: dict[tuple[str, str], Document]) -> tuple[Document, Document]:
    deployment = objects[("Deployment", "tidings")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def _configured(objects: dict[tuple[str, str], Document]) -> dict[str, str]:
    config = dict(objects[("ConfigMap", "tidings")]["data"])
    config.update(objects[("Secret", "tidings")]["stringData"])
    return config


def test_k8s_env_names_are_settings_and_their_values_valid(
    objects: dict[tuple[str, str], Document], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, container = _server(objects)
    sources = {
        ref.get("configMapRef", ref.get("secretRef"))["name"] for ref in container["envFrom"]
    }
    assert sources == {"tidings"}
    config = _configured(objects)
    names = set(config) | {variable["name"] for variable in container.get("env", [])}
    assert names <= tidings_names(), names - tidings_names()
    expected = {
        "TIDINGS_HOST": "0.0.0.0",  # noqa: S104 (the Service must reach it)
        "TIDINGS_CHANGE_STREAM_SCOPE": "database",
        "TIDINGS_LOG_LEVEL": "INFO",
        "TIDINGS_METRICS_PORT": "9090",
    }
    assert {name: config[name] for name in expected} == expected
    assert {"TIDINGS_DRAIN_DELAY", "TIDINGS_DRAIN_DEADLINE"} <= set(config)
    # The placeholder secret cannot start a pod: shorter than Tidings accepts.
    assert len(config["TIDINGS_JWT_SECRET"].encode()) < MIN_SECRET_BYTES
    assert "REPLACE" in config["TIDINGS_JWT_SECRET"]
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # Raises if a value does not validate (the drain fitting, say).
    assert settings.mongodb_uri is not None
    assert "replicaSet=rs0" in settings.mongodb_uri


def test_k8s_probes_use_the_apps_paths_and_ports(
    objects: dict[tuple[str, str], Document],
) -> None:
    _, container = _server(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    settings = _configured(objects)
    assert ports == {
        "http": int(settings["TIDINGS_PORT"]),
        "metrics": int(settings["TIDINGS_METRICS_PORT"]),
    }
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness")}
    probes["readiness"] = container["readinessProbe"]["httpGet"]
    assert probes["readiness"]["path"] == "/readyz"
    assert probes["liveness"]["path"] == "/healthz"
    assert {probe["path"] for probe in probes.values()} <= app_paths()
    assert {probe["port"] for probe in probes.values()} == {"http"}
    # /readyz waits TIDINGS_READY_TIMEOUT for the database; the probe must wait longer.
    assert container["readinessProbe"]["timeoutSeconds"] > Settings().ready_timeout


def test_k8s_grace_period_covers_prestop_and_the_drain_deadline(
    objects: dict[tuple[str, str], Document],
) -> None:
    deployment, container = _server(objects)
    config = _configured(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert len(command) == 2
    pre_stop = float(command[1])
    deadline = float(config["TIDINGS_DRAIN_DEADLINE"])
    delay = float(config["TIDINGS_DRAIN_DELAY"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The grace period counts from the deletion, preStop included; SIGTERM follows
    # preStop, and the process is gone within the deadline of it. Then a margin.
    assert delay < deadline
    assert grace >= pre_stop + deadline + 5, (grace, pre_stop, deadline)


def test_k8s_pods_run_non_root_on_a_read_only_root_filesystem(
    objects: dict[tuple[str, str], Document],
) -> None:
    workloads = [
        o for (kind, _), o in objects.items() if kind in {"Deployment", "StatefulSet", "Job"}
    ]
    assert len(workloads) == 3
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        mounted_tmp = {volume["name"] for volume in pod.get("volumes", []) if "emptyDir" in volume}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert any(
                mount["mountPath"] == RUN_TIME_WRITABLE and mount["name"] in mounted_tmp
                for mount in container["volumeMounts"]
            ), "an emptyDir at /tmp, the one writable place"
            assert set(container["resources"]) == {"limits", "requests"}
    # The user the image declares.
    deployment, _ = _server(objects)
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    final = Dockerfile.parse(DOCKERFILE.read_text()).stages[-1]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == final.one("USER").arguments


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1.0, "Gi": 1024.0}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity)
    assert match, quantity
    return int(match[1]) * units[match[2]]


def test_k8s_memory_is_sized_for_the_connections_a_pod_takes(
    objects: dict[tuple[str, str], Document],
) -> None:
    _, container = _server(objects)
    connections = int(_configured(objects)["TIDINGS_MAX_CONNECTIONS"])
    needed = connections * KIB_PER_CONNECTION / 1024
    request = _mebibytes(container["resources"]["requests"]["memory"])
    limit = _mebibytes(container["resources"]["limits"]["memory"])
    assert needed < request <= limit
    image = container["image"]
    assert image == f"tidings:{PYPROJECT['project']['version']}"


def test_k8s_ingress_keeps_idle_websockets_and_routes_only_ws(
    objects: dict[tuple[str, str], Document],
) -> None:
    ingress = objects[("Ingress", "tidings")]
    annotations = ingress["metadata"]["annotations"]
    ping = float(_configured(objects).get("TIDINGS_PING_INTERVAL", Settings().ping_interval))
    for direction in ("read", "send"):
        timeout = float(annotations[f"nginx.ingress.kubernetes.io/proxy-{direction}-timeout"])
        assert timeout > ping, f"{direction} timeout {timeout} <= ping interval {ping}"
    assert ingress["spec"]["tls"], "TLS"
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [p["path"] for p in paths] == ["/ws"]
    assert "/ws" in app_paths()
    service = objects[("Service", "tidings")]
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {p["backend"]["service"]["port"]["name"] for p in paths} == {"http"}
    assert {p["backend"]["service"]["name"] for p in paths} == {"tidings"}
    assert service["spec"]["type"] == "ClusterIP"
    assert (ports["http"]["port"], ports["http"]["targetPort"]) == (80, "http")
    assert (ports["metrics"]["port"], ports["metrics"]["targetPort"]) == (9090, "metrics")


def test_k8s_selectors_match_the_server_pods(objects: dict[tuple[str, str], Document]) -> None:
    deployment, _ = _server(objects)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        objects[("Service", "tidings")]["spec"]["selector"],
        objects[("PodDisruptionBudget", "tidings")]["spec"]["selector"]["matchLabels"],
        objects[("NetworkPolicy", "tidings")]["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items(), selector
    hpa = objects[("HorizontalPodAutoscaler", "tidings")]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tidings",
    }
    assert hpa["minReplicas"] >= 2
    assert deployment["spec"]["replicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert objects[("PodDisruptionBudget", "tidings")]["spec"]["maxUnavailable"] == 1


def test_k8s_network_policy_admits_ingress_and_monitoring_and_egress_to_mongodb_and_dns(
    objects: dict[tuple[str, str], Document],
) -> None:
    policy = objects[("NetworkPolicy", "tidings")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    admitted = {
        rule["ports"][0]["port"]: rule["from"][0]["namespaceSelector"]["matchLabels"][
            "kubernetes.io/metadata.name"
        ]
        for rule in policy["ingress"]
    }
    assert admitted == {8000: "ingress-nginx", 9090: "monitoring"}
    egress = {
        (port["protocol"], port["port"]) for rule in policy["egress"] for port in rule["ports"]
    }
    assert egress == {("TCP", 27017), ("UDP", 53), ("TCP", 53)}


def test_k8s_mongodb_is_a_replica_set_matching_the_uri_and_compose(
    objects: dict[tuple[str, str], Document], compose: Document
) -> None:
    statefulset = objects[("StatefulSet", "mongodb")]["spec"]
    (container,) = statefulset["template"]["spec"]["containers"]
    assert container["image"] == compose["services"]["mongodb"]["image"]
    args = container["args"]
    assert args[args.index("--replSet") + 1] == "rs0"
    assert statefulset["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    headless = objects[("Service", "mongodb")]["spec"]
    assert headless["clusterIP"] == "None"
    assert statefulset["serviceName"] == "mongodb"
    members = [f"mongodb-{i}.mongodb:27017" for i in range(statefulset["replicas"])]
    uri = _configured(objects)["TIDINGS_MONGODB_URI"]
    assert uri == f"mongodb://{','.join(members)}/?replicaSet=rs0"
    (init,) = objects[("Job", "mongodb-init")]["spec"]["template"]["spec"]["containers"]
    script = init["command"][-1]
    assert "rs.initiate" in script
    assert all(f'"{member}"' in script for member in members)
