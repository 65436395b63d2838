"""`paychan node` and an absent ledger: the daemon waits for one started after it, and a command
that cannot reach one fails with a single clear line, not a traceback."""
from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines_of(stream: IO[str]) -> queue.Queue[str]:
    """Every line of `stream`, read on a thread so that a test can wait with a deadline."""
    out: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stream:
            out.put(line.rstrip("\n"))
    threading.Thread(target=read, daemon=True).start()
    return out


def wait_for_line(lines: queue.Queue[str], needle: str, what: str) -> str:
    deadline = time.monotonic() + WAIT
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no line with {needle!r} ({what}) within {WAIT} s"
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if needle in line:
            return line


def test_node_run_waits_for_a_ledger_started_after_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = subprocess.Popen(
        [str(BIN / "paychan"), "node", "run", "--data", str(tmp_path / "node"), "--ledger", url,
         "--listen", f"http://127.0.0.1:{free_port()}", "--wait-ledger", str(WAIT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ledger: subprocess.Popen[str] | None = None
    try:
        assert node.stdout is not None and node.stderr is not None
        out, err = lines_of(node.stdout), lines_of(node.stderr)
        wait_for_line(err, "ledger not answering", "the node retrying")
        assert node.poll() is None  # still waiting, not failed
        ledger = subprocess.Popen(
            [str(BIN / "paychan"), "ledger", "serve", "--data", str(tmp_path / "ledger"),
             "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        line = wait_for_line(out, "running", "the node to start once the ledger answers")
        assert line.startswith("node ak_"), line
    finally:
        for proc in (node, ledger):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=WAIT) for proc in (node, ledger) if proc is not None]
    assert codes == [0, 0]


def test_node_pay_without_a_ledger_fails_with_one_clear_line(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run(
        [str(BIN / "paychan"), "node", "pay", "--data", str(tmp_path / "payer"), "--ledger", url,
         "--peer", "http://127.0.0.1:1"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"paychan node pay: LedgerUnreachable: {url}/info"), done.stderr
    assert done.stdout == ""
