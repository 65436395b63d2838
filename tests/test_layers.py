"""Imports go one way (DESIGN §2): protocol <- storage <- actors <- face <- simulations."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"protocol": "paychan.protocol", "storage": "paychan.storage",
           "actors": "paychan.actors", "paychan": "paychan", "simulations": "paychan.simulations"}
SUBPACKAGES = ("protocol", "storage", "actors", "simulations")

# protocol/ is pure: no threads, sockets, files, clocks, randomness or I/O libraries.
IMPURE = ("threading", "socket", "time", "random", "asyncio", "subprocess", "lmdb", "pykka",
          "aiohttp", "multiprocessing", "os")

# Layers a folder must not import (a layer is one of SUBPACKAGES or "face" for the rest of
# `paychan`), and third-party or stdlib top-level modules it must not import.
FORBIDDEN_LAYERS = {
    "protocol": {"storage", "actors", "simulations", "face"},
    "storage": {"actors", "simulations", "face"},
    "actors": {"simulations", "face"},
}
FORBIDDEN_MODULES = {
    "protocol": set(IMPURE),
    "storage": {"pykka"},
    "actors": set(),
}


def layer_of(module: str) -> str | None:
    """The paychan layer a fully qualified module belongs to, or None for outside modules."""
    parts = module.split(".")
    if parts[0] in SUBPACKAGES:  # an import written without the namespace still names a layer
        return parts[0]
    if parts[0] != "paychan":
        return None
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "face"


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, fully qualified module) of every import in `source`, a module of `package`.

    `from a import b` yields `a.b` as well as `a`, so `from paychan import storage` is caught;
    `importlib.import_module("x")` and `__import__("x")` with a literal name count too.
    """
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names
                    if alias.name in SUBPACKAGES and mod == "paychan"]
        elif isinstance(node, ast.Call) and node.args:
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            arg = node.args[0]
            if (name in ("import_module", "__import__") and isinstance(arg, ast.Constant)
                    and isinstance(arg.value, str)):
                out.append((node.lineno, arg.value))
    return out


def violations(source: str, folder: str, filename: str = "<src>",
               package: str | None = None) -> list[str]:
    """Every import in `source` (a file of `folder`, in `package`) that breaks the rules."""
    package = package or FOLDERS[folder]
    bad_layers = FORBIDDEN_LAYERS.get(folder, set())
    bad_modules = FORBIDDEN_MODULES.get(folder, set())
    found = []
    for line, module in imported_modules(source, package):
        layer = layer_of(module)
        top = module.split(".")[0]
        if layer in bad_layers:
            found.append(f"{filename}:{line}: {folder}/ imports {module} (layer {layer})")
        elif top in bad_modules:
            found.append(f"{filename}:{line}: {folder}/ imports {module}")
    return found


def source_files() -> list[tuple[str, Path]]:
    files = []
    for folder in FOLDERS:
        files += [(folder, p) for p in sorted((ROOT / folder).rglob("*.py"))]
    return files


def package_of(folder: str, path: Path) -> str:
    """The import name of the package holding `path` (setup.cfg maps folders into `paychan.*`)."""
    sub = path.parent.relative_to(ROOT / folder).parts
    return ".".join([FOLDERS[folder], *sub])


def test_there_are_files_to_check() -> None:
    folders = {folder for folder, _ in source_files()}
    assert {"protocol", "storage", "actors", "paychan"} <= folders
    assert any(p.name == "channel.py" for f, p in source_files() if f == "protocol")


def test_imports_go_one_way() -> None:
    found = []
    for folder, path in source_files():
        found += violations(path.read_text(encoding="utf-8"), folder,
                            str(path.relative_to(ROOT)), package_of(folder, path))
    assert not found, "layering violations:\n" + "\n".join(found)


@pytest.mark.parametrize("source, folder", [
    ("import time\n", "protocol"),
    ("import os.path\n", "protocol"),
    ("from os import path\n", "protocol"),
    ("import threading as t\n", "protocol"),
    ("from random import randbytes\n", "protocol"),
    ("from paychan.storage.env import Store\n", "protocol"),
    ("from paychan import storage\n", "protocol"),
    ("from paychan.errors import PaychanError\n", "protocol"),
    ("import paychan\n", "protocol"),
    ("from ..actors import node\n", "protocol"),
    ("from . import channel\nfrom .. import api\n", "protocol"),
    ("def f():\n    import lmdb\n", "protocol"),
    ("import importlib\nimportlib.import_module('socket')\n", "protocol"),
    ("from paychan.actors.node import NodeCore\n", "storage"),
    ("import pykka\n", "storage"),
    ("from paychan.simulations import run\n", "storage"),
    ("from paychan.simulations.report import plot\n", "actors"),
    ("import simulations\n", "actors"),
])
def test_checker_flags_bad_imports(source: str, folder: str) -> None:
    assert violations(source, folder), f"{source!r} in {folder}/ should be flagged"


@pytest.mark.parametrize("source, folder", [
    ("from paychan.protocol.errors import DecodeError\nimport msgpack\n", "protocol"),
    ("from . import errors\nfrom .wire import encode\n", "protocol"),
    ("import lmdb\nfrom paychan.protocol import wire\n", "storage"),
    ("import pykka\nimport threading\nfrom paychan.storage.env import Store\n", "actors"),
    ("from paychan.actors.node import NodeCore\nimport time\n", "paychan"),
    ("from paychan.actors import node\nfrom paychan import api\n", "simulations"),
])
def test_checker_accepts_good_imports(source: str, folder: str) -> None:
    assert violations(source, folder) == []


def test_package_of_follows_the_folder_mapping() -> None:
    assert package_of("protocol", ROOT / "protocol" / "wire.py") == "paychan.protocol"
    assert package_of("actors", ROOT / "actors" / "http" / "server.py") == "paychan.actors.http"
    assert package_of("paychan", ROOT / "paychan" / "cli.py") == "paychan"


def test_relative_imports_resolve_against_the_package() -> None:
    assert imported_modules("from ..storage import env\n", "paychan.protocol") == [
        (1, "paychan.storage")]
    assert imported_modules("from .wire import x\n", "paychan.protocol") == [
        (1, "paychan.protocol.wire")]
