"""The README's by-hand commands work as written: ledger, hub, a node, payers by HTTP and chat."""
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commands(tmp_path):
    section = README.read_text().split("## Across processes, by hand", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    ports = {str(p): str(free_port()) for p in (7000, 7001, 7002)}
    out = []
    for line in "\n".join(blocks).splitlines():
        if not line.strip():
            continue
        for old, new in ports.items():
            line = re.sub(rf"\b{old}\b", new, line)
        line = line.replace("/tmp/pc/", f"{tmp_path}/").replace(".venv/bin/", f"{BIN}/")
        out.append(shlex.split(line))
    return out


def test_by_hand_commands(tmp_path):
    cmds = commands(tmp_path)
    assert [c[1:3] for c in cmds] == [["ledger", "serve"], ["hub", "serve"], ["node", "run"],
                                      ["node", "pay"], ["node", "pay"]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    servers = []
    logs = [tmp_path / f"server{i}.err" for i in range(3)]
    try:
        for cmd, log in zip(cmds[:3], logs, strict=True):
            with open(log, "w") as err:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                        env=env)
            servers.append(proc)
            first = proc.stdout.readline()
            assert "listening" in first or "running" in first, first
        code = servers[2].stdout.readline().split()[-1]
        assert re.fullmatch(r"ak_\w+@127\.0\.0\.1:\d+#\w+", code), code
        alice = subprocess.run(cmds[3], capture_output=True, text=True, timeout=60, env=env)
        assert alice.returncode == 0, alice.stderr
        lines = alice.stdout.splitlines()
        assert lines[0].startswith("opened ch_")
        assert [json.loads(x) for x in lines[1:4]] == [{"echo": "hello", "amount": 5}] * 3
        assert json.loads(lines[4])["sent_by_me"] == 15 and lines[5] == "closed"
        carol_cmd = [code if arg.startswith("ak_...") else arg for arg in cmds[4]]
        carol = subprocess.run(carol_cmd, capture_output=True, text=True, timeout=60, env=env)
        assert carol.returncode == 0, carol.stderr
        assert json.loads(carol.stdout.splitlines()[-1])["sent_by_me"] == 3
    finally:
        for proc in reversed(servers):
            proc.send_signal(signal.SIGINT)  # the README's Ctrl-C
        codes = [proc.wait(timeout=20) for proc in servers]
    assert codes == [0, 0, 0]
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-2000:]
