"""Every module imports on its own, dependencies point one way, and HTTP stays in api/.

The layers, lowest first (a module may import only from its own layer or lower ones):

1. `errors`, `config`, `clock`, `media` and the other small leaf modules
2. `codecs`, `dsp`, `rtp`, `sip`
3. `mixing`, `encoding`, `ws`, `webrtc`
4. `storage`, `webhooks`, `catalog`
5. `recorder` (the only place that wires stages together for a call)
6. `calls` (call control: SIP and RTP, the WHIP sink, the WebSocket stream loops)
7. `api` (parses HTTP, calls the layers below, maps their refusals to statuses)
8. `cli`, `__main__`, `tools`

Each module is imported in a fresh interpreter, as aiohttp's tests/test_circular_imports.py
does: an import cycle or a missing import that another module's earlier import would hide
in one shared process shows up there. Below api/, nothing imports `aiohttp.web` and nothing
raises or builds `ServiceError` (an HTTP status): those layers raise `errors.Refused` kinds.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import mediaserver

LAYERS = {
    "errors": 1, "config": 1, "clock": 1, "media": 1, "options": 1, "ids": 1, "tasks": 1, "jsonsafe": 1,
    "codecs": 2, "dsp": 2, "rtp": 2, "sip": 2,
    "mixing": 3, "encoding": 3, "ws": 3, "webrtc": 3,
    "storage": 4, "webhooks": 4, "catalog": 4,
    "recorder": 5,
    "calls": 6,
    "api": 7,
    "cli": 8, "__main__": 8, "tools": 8,
}
HTTP_PARTS = {"api", "cli", "__main__", "tools"}  # the parts that may serve or drive HTTP
ROOT = Path(mediaserver.__file__).parent
IMPORT_TIMEOUT_S = 60.0


def modules() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages([str(ROOT)], "mediaserver.")
                  if info.name.split(".")[1] != "__main__")


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return 0
    return LAYERS[parts[1]]


def sources() -> list[tuple[str, str, Path]]:
    """(module name, package it resolves relative imports in, path) of every source file."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found.append((name.removesuffix(".__init__"), package, path))
    return found


def imported(tree: ast.AST, package: str) -> set[str]:
    """The modules a source imports, with relative imports resolved against `package`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
    return names


def _is_aiohttp_web(module: str) -> bool:
    return module in ("aiohttp.web", "aiohttp.web_exceptions") or module.startswith(("aiohttp.web.", "aiohttp.web_"))


def web_imports(tree: ast.AST) -> list[str]:
    """Where a source imports aiohttp's server side (`aiohttp.web` and its `web_*` modules)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if _is_aiohttp_web(a.name)]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if _is_aiohttp_web(node.module):
                found.append(f"line {node.lineno}: from {node.module} import ...")
            elif node.module == "aiohttp":
                found += [f"line {node.lineno}: from aiohttp import {a.name}" for a in node.names
                          if _is_aiohttp_web(f"aiohttp.{a.name}")]
    return found


def _names_service_error(node: ast.AST | None) -> bool:
    return (isinstance(node, ast.Name) and node.id == "ServiceError") or (
        isinstance(node, ast.Attribute) and node.attr == "ServiceError")


def service_errors(tree: ast.AST) -> list[str]:
    """Where a source builds a `ServiceError` (an error that names an HTTP status) or raises
    the class itself."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _names_service_error(node.func):
            found.append(f"line {node.lineno}: ServiceError(...)")
        elif isinstance(node, ast.Raise) and _names_service_error(node.exc):
            found.append(f"line {node.lineno}: raise ServiceError")
    return found


def import_in_fresh_interpreter(name: str, path: Path = ROOT.parent) -> subprocess.CompletedProcess:
    """`import name` in a new Python with warnings as errors, `path` first on sys.path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-W", "error", "-c", f"import {name}"], cwd=path, env=env,
                          capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S)


# -- every module imports on its own ----------------------------------------------------


@pytest.fixture(scope="module")
def fresh_imports(request: pytest.FixtureRequest):
    """The selected modules' imports, each in its own interpreter, run side by side."""
    selected = sorted({item.callspec.params["name"] for item in request.session.items
                       if getattr(item, "originalname", None) == "test_module_imports_in_a_fresh_interpreter"})
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures: dict[str, Future] = {name: pool.submit(import_in_fresh_interpreter, name) for name in selected}
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.mark.parametrize("name", modules())
def test_module_imports_in_a_fresh_interpreter(name, fresh_imports):
    future = fresh_imports.get(name)
    result = future.result() if future is not None else import_in_fresh_interpreter(name)
    assert result.returncode == 0, f"import {name} failed:\n{result.stderr}"


def test_a_fresh_interpreter_sees_an_import_cycle_and_a_warning(tmp_path):
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\nB = 2\n")
    (package / "noisy.py").write_text("import warnings\nwarnings.warn('old', DeprecationWarning)\n")
    result = import_in_fresh_interpreter("cyclic.a", tmp_path)
    assert result.returncode != 0 and "circular import" in result.stderr
    result = import_in_fresh_interpreter("cyclic.noisy", tmp_path)
    assert result.returncode != 0 and "DeprecationWarning" in result.stderr
    assert import_in_fresh_interpreter("cyclic", tmp_path).returncode == 0


# -- dependencies point down --------------------------------------------------------------


def test_every_top_level_part_has_a_layer():
    for path in ROOT.iterdir():
        if path.name.startswith("_") and path.name not in ("__main__.py",):
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            assert path.stem in LAYERS, f"{path.name} has no layer in the table above"


def test_dependencies_point_down():
    wrong = []
    for name, package, path in sources():
        targets = imported(ast.parse(path.read_text()), package)
        for target in sorted(t for t in targets if t == "mediaserver" or t.startswith("mediaserver.")):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(wrong)


def test_calls_sit_between_the_recorder_and_the_api():
    assert layer_of("mediaserver.recorder.engine") < layer_of("mediaserver.calls.sip") < layer_of("mediaserver.api.app")
    assert layer_of("mediaserver.api.app") < layer_of("mediaserver.cli") == layer_of("mediaserver.tools.fuzz")


def test_relative_imports_resolve_against_the_package():
    tree = ast.parse("from . import keys\nfrom ..errors import Refused\nfrom .common import iso\n")
    assert imported(tree, "mediaserver.api") == {"mediaserver.api", "mediaserver.errors", "mediaserver.api.common"}


# -- HTTP stays in api/ -------------------------------------------------------------------


def _below_http() -> list[tuple[str, Path]]:
    """The sources outside api/, cli and tools (the package's own `__init__` included)."""
    return [(name, path) for name, _, path in sources() if name.partition(".")[2].split(".")[0] not in HTTP_PARTS]


def test_nothing_below_the_api_imports_aiohttp_web():
    wrong = [f"{name} {where}" for name, path in _below_http() for where in web_imports(ast.parse(path.read_text()))]
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_api_raises_an_http_status():
    wrong = [f"{name} {where}" for name, path in _below_http() for where in service_errors(ast.parse(path.read_text()))]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("source", [
    "from aiohttp import web",
    "from aiohttp import ClientSession, web",
    "import aiohttp.web",
    "import aiohttp.web as w",
    "from aiohttp.web import Response",
    "from aiohttp.web_exceptions import HTTPNotFound",
    "from aiohttp import web_request",
    "def f():\n    from aiohttp import web\n",
])
def test_the_web_import_check_finds(source):
    assert web_imports(ast.parse(source))


@pytest.mark.parametrize("source", [
    "import aiohttp",
    "from aiohttp import ClientSession, ClientTimeout",
    "import aiohttp.client",
    "from .web import page",
    "from mediaserver.api import web",
])
def test_the_web_import_check_passes(source):
    assert not web_imports(ast.parse(source))


@pytest.mark.parametrize("source", [
    "raise ServiceError(409, 'x', 'y')",
    "raise errors.ServiceError(409, 'x', 'y') from None",
    "def f():\n    return ServiceError(503, 'x', 'y')\n",
    "raise ServiceError",
    "failure = mediaserver.errors.ServiceError(400, 'x', 'y')",
])
def test_the_http_status_check_finds(source):
    assert service_errors(ast.parse(source))


@pytest.mark.parametrize("source", [
    "raise Conflict('sessions.ended', 'over')",
    "raise RateLimited('commands.cooldown', 'soon', retry_after_s=2)",
    "from mediaserver.errors import ServiceError",
    "status = 409",
])
def test_the_http_status_check_passes(source):
    assert not service_errors(ast.parse(source))
