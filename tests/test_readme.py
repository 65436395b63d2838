"""The README's Python example runs as written and prints what it claims."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    block = block.replace("/tmp/pc/", f"{tmp_path}/")
    out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "997 3" in out.stdout.splitlines()
    assert out.stdout.splitlines()[-1] == "3"


def test_readme_quick_start_is_what_ci_runs():
    commands = re.search(r"## Quick start.*?```sh\n(.*?)```", README.read_text(), re.S).group(1)
    lines = [line for line in commands.splitlines() if line.strip()]
    assert len(lines) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert lines[1] in ci
    assert "paychan demo" in lines[0]
