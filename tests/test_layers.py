"""Every module imports, and dependencies point one way (see STYLE.md's layer table)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import mediaserver

LAYERS = {
    "errors": 1, "config": 1, "clock": 1, "media": 1, "options": 1, "ids": 1, "tasks": 1, "jsonsafe": 1,
    "codecs": 2, "dsp": 2, "rtp": 2, "sip": 2,
    "mixing": 3, "encoding": 3, "ws": 3, "webrtc": 3,
    "storage": 4, "webhooks": 4, "catalog": 4,
    "recorder": 5,
    "api": 6,
    "cli": 7, "__main__": 7, "tools": 7,
}
ROOT = Path(mediaserver.__file__).parent


def modules():
    for info in pkgutil.walk_packages([str(ROOT)], "mediaserver."):
        if info.name.split(".")[1] != "__main__":
            yield info.name


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) == 1:
        return 0
    return LAYERS[parts[1]]


def imported(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text())
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
    return {n for n in names if n == "mediaserver" or n.startswith("mediaserver.")}


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_imports(name):
    importlib.import_module(name)


def test_every_top_level_part_has_a_layer():
    for path in ROOT.iterdir():
        if path.name.startswith("_") and path.name not in ("__main__.py",):
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            assert path.stem in LAYERS, f"{path.name} has no layer in STYLE.md's table"


def test_dependencies_point_down():
    wrong = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        name = name.removesuffix(".__init__")
        for target in imported(path, package):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(wrong)
