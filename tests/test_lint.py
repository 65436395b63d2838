"""ruff and mypy run clean over the repository (STYLE: "mypy and ruff run clean")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ("protocol", "storage", "actors", "simulations")


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=540)


def test_ruff_is_clean() -> None:
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, f"ruff check failed:\n{proc.stdout}\n{proc.stderr}"


def _package_tree(tmp: Path) -> Path:
    """A `paychan/` folder laid out like the installed package: setup.cfg maps `protocol/` to
    `paychan.protocol` (and so on), which mypy cannot follow from the repository's layout."""
    pkg = tmp / "paychan"
    pkg.mkdir()
    for entry in (ROOT / "paychan").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub in SUBPACKAGES:
        (pkg / sub).symlink_to(ROOT / sub, target_is_directory=True)
    return pkg


def test_mypy_is_clean(tmp_path: Path) -> None:
    pkg = _package_tree(tmp_path)
    proc = _run("mypy", "--config-file", str(ROOT / "pyproject.toml"),
                "--cache-dir", str(tmp_path / ".mypy_cache"), str(pkg), cwd=tmp_path)
    assert proc.returncode == 0, f"mypy failed:\n{proc.stdout}\n{proc.stderr}"
