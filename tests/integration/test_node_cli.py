"""`paychan node`: the daemon waits for a ledger started after it, writes a line per channel
event, and stops cleanly on SIGTERM and SIGINT (Ctrl-C); a command that cannot reach a ledger
fails with a single clear line, not a traceback, and so does `node pay` on Ctrl-C."""
from __future__ import annotations

import json
import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from paychan import Ledger, Node
from paychan.node_cli import LOG_MESSAGE_CHARS, BoundedFormatter

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


def stop_all(procs: list[subprocess.Popen[str]],
             sig: signal.Signals = signal.SIGTERM) -> list[int]:
    """Each process's exit code after `sig`; one still alive after WAIT is killed, so that no
    test leaves a process behind (its code is then -9, which the test's assertion shows)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=WAIT))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


def start_ledger(data: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "paychan"), "ledger", "serve", "--data", str(data), "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def start_node(data: Path, ledger: str, listen: str, log: Path,
               *more: str) -> subprocess.Popen[str]:
    """`paychan node run`, its log (stderr) going to the file `log`, as a service's would."""
    with open(log, "w") as err:
        return subprocess.Popen(
            [str(BIN / "paychan"), "node", "run", "--data", str(data), "--ledger", ledger,
             "--listen", listen, *more],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)


def ledger_and_node(tmp_path: Path, log: Path, procs: list[subprocess.Popen[str]],
                    *more: str) -> tuple[str, str, subprocess.Popen[str]]:
    """`paychan ledger serve` and a `paychan node run` on it, both running: (ledger URL, node
    URL, node). Both go into `procs`, the node first: stopped first, as it talks to the ledger
    until then."""
    ledger_port, node_port = free_port(), free_port()
    ledger_url, node_url = f"http://127.0.0.1:{ledger_port}", f"http://127.0.0.1:{node_port}"
    procs.append(start_ledger(tmp_path / "ledger", ledger_port))
    assert procs[-1].stdout is not None
    wait_for_line(lines_of(procs[-1].stdout), "listening", "the ledger to start")
    node = start_node(tmp_path / "node", ledger_url, node_url, log, *more)
    procs.insert(0, node)
    assert node.stdout is not None
    wait_for_line(lines_of(node.stdout), "running", "the node to start")
    return ledger_url, node_url, node


def wait_for_text(path: Path, needle: str, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while needle not in path.read_text():
        assert time.monotonic() < deadline, f"no {needle!r} ({what}) in {path} within {WAIT} s"
        time.sleep(0.05)


def test_node_run_waits_for_a_ledger_started_after_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    node = subprocess.Popen(
        [str(BIN / "paychan"), "node", "run", "--data", str(tmp_path / "node"), "--ledger", url,
         "--listen", f"http://127.0.0.1:{free_port()}", "--wait-ledger", str(WAIT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [node]
    try:
        assert node.stdout is not None and node.stderr is not None
        out, err = lines_of(node.stdout), lines_of(node.stderr)
        wait_for_line(err, "ledger not answering", "the node retrying")
        assert node.poll() is None  # still waiting, not failed
        procs.append(start_ledger(tmp_path / "ledger", port))
        line = wait_for_line(out, "running", "the node to start once the ledger answers")
        assert line.startswith("node ak_"), line
    finally:
        codes = stop_all(procs)
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


def test_node_run_logs_one_line_per_channel_event(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    procs: list[subprocess.Popen[str]] = []
    try:
        ledger_url, node_url, node = ledger_and_node(tmp_path, log, procs)
        with Ledger.connect(ledger_url) as ledger, \
                Node.open(str(tmp_path / "payer"), ledger=ledger) as payer:
            ledger.mint(payer.address, 1000)
            ch = payer.create_channel(node_url, 500, timeout=WAIT)
            reply = payer.send_message_and_pay(ch, "hello", 7, timeout=WAIT,
                                               payment_id="first-payment")
            assert reply == {"echo": "hello", "amount": 7}
            # Near the largest body a message may have: its line must not quote it.
            payer.send_message(ch, "y" * 60_000)
            wait_for_text(log, " message ", "the free message arriving")
            assert payer.close(ch, timeout=WAIT)["mutual"] is True
        # The node hears of the settlement from the ledger, maybe after the payer did.
        wait_for_text(log, "channel_closed", "the node seeing the close settled")
        assert stop_all([node]) == [0]
    finally:
        codes = stop_all(procs)
    assert codes[-1] == 0  # the ledger
    lines = log.read_text().splitlines()

    def lines_about(event: str) -> list[str]:
        # A whole word: "channel_closed" is not "channel_closed_with_fraud_proof".
        return [line for line in lines if re.search(rf"\b{event}\b", line)]

    # Exactly one each: a line written both by the node and by the daemon is a duplicate.
    for event in ("channel_created_by_peer", "channel_open", "deposit_confirmed",
                  "payment_received", "message", "channel_closing", "channel_closed"):
        found = lines_about(event)
        assert len(found) == 1, (event, found)
        assert f"{ch}: {event} " in found[0], found[0]
    paid = lines_about("payment_received")[0]
    assert "'amount': 7" in paid and "'payment_id': 'first-payment'" in paid, paid
    assert "hello" not in paid  # the message is the handler's, not the log's
    assert "y" * 100 not in log.read_text()
    # The timestamp, level and logger name come on top of the message.
    assert max(len(line) for line in lines) < LOG_MESSAGE_CHARS + 100, max(lines, key=len)
    assert any(line.endswith("INFO paychan.daemon: stopping") for line in lines), lines[-3:]
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["running", "awaiting its ledger"])
def test_node_run_stops_cleanly_on_a_signal(tmp_path: Path, sig: signal.Signals,
                                            when: str) -> None:
    # SIGINT is what Ctrl-C sends, as the README tells users to stop the node with; SIGTERM
    # is a service manager's. Both come, too, while a node still awaits its ledger.
    ledger_port = free_port()
    log = tmp_path / "node.log"
    procs = []
    try:
        if when == "running":
            procs.append(start_ledger(tmp_path / "ledger", ledger_port))
        # Awaiting the ledger longer than the test waits: the signal must cut the wait short.
        node = start_node(tmp_path / "node", f"http://127.0.0.1:{ledger_port}",
                          f"http://127.0.0.1:{free_port()}", log, "--wait-ledger", str(4 * WAIT))
        procs.insert(0, node)
        if when == "running":
            assert node.stdout is not None
            wait_for_line(lines_of(node.stdout), "running", "the node to start")
        else:
            wait_for_text(log, "ledger not answering", "the node retrying")
        started = time.monotonic()
        node.send_signal(sig)
        code = node.wait(timeout=WAIT)
        took = time.monotonic() - started
    finally:
        stop_all(procs)
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert took < 10.0, took
    assert "Traceback" not in text, text[-2000:]
    assert re.search(r"INFO paychan\.daemon: stopping$", text, re.M), text[-2000:]


def test_a_long_log_message_is_cut_but_not_its_traceback() -> None:
    # What a peer sends (an error's text, up to 64 KiB) reaches some of the node's log lines.
    formatter = BoundedFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("paychan.node", logging.WARNING, __file__, 1, "peer said %s",
                                   ("x" * 70_000,), sys.exc_info())
    first, *rest = formatter.format(record).splitlines()
    assert len(first) < LOG_MESSAGE_CHARS + 100, len(first)
    assert first.endswith(f"... ({len('peer said ') + 70_000} chars)"), first[-40:]
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: boom"


def test_ctrl_c_ends_node_pay_in_one_line_and_its_store_pays_on(tmp_path: Path) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        ledger_url, node_url, _ = ledger_and_node(tmp_path, tmp_path / "node.log", procs)
        pay = [str(BIN / "paychan"), "node", "pay", "--data", str(tmp_path / "alice"),
               "--ledger", ledger_url, "--peer", node_url, "--amount", "1"]
        alice = subprocess.Popen([*pay, "--mint", "100000", "--deposit", "50000",
                                  "--count", "40000"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        procs.insert(0, alice)
        assert alice.stdout is not None and alice.stderr is not None
        out = lines_of(alice.stdout)
        wait_for_line(out, "opened ch_", "alice to open a channel")
        for _ in range(20):  # paying by now
            wait_for_line(out, '"echo"', "alice's payments")
        alice.send_signal(signal.SIGINT)
        assert alice.wait(timeout=WAIT) == 130
        err = alice.stderr.read()
        assert "Traceback" not in err and err.strip().splitlines()[-1] == (
            "paychan node pay: interrupted"), err
        answered = 20 + sum(1 for _ in iter(lambda: _next(out), None))
        # Ctrl-C let the payment under way finish, then stopped: every payment made was
        # printed. The same store pays on, on the same channel, counting all of them.
        again = subprocess.run([*pay, "--count", "2"], stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=WAIT)
        assert again.returncode == 0, again.stderr
        sent = json.loads(again.stdout.splitlines()[-1])["sent_by_me"]
        assert sent == answered + 2, (answered, sent)
    finally:
        codes = stop_all(procs)
    assert codes[1:] == [0, 0]


def _next(lines: queue.Queue[str]) -> str | None:
    """The next line already read that is a payment's answer, or None when none is left."""
    while True:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            return None
        if '"echo"' in line:
            return line


def test_no_payment_log_leaves_out_only_the_payment_lines(tmp_path: Path) -> None:
    log = tmp_path / "node.log"
    procs: list[subprocess.Popen[str]] = []
    try:
        ledger_url, node_url, node = ledger_and_node(tmp_path, log, procs, "--no-payment-log")
        with Ledger.connect(ledger_url) as ledger, \
                Node.open(str(tmp_path / "payer"), ledger=ledger) as payer:
            ledger.mint(payer.address, 1000)
            ch = payer.create_channel(node_url, 500, timeout=WAIT)
            for i in range(3):
                assert payer.send_message_and_pay(ch, i, 1, timeout=WAIT)["echo"] == i
        wait_for_text(log, "channel_open", "the channel's line")
        assert stop_all([node]) == [0]
    finally:
        stop_all(procs)
    text = log.read_text()
    assert "payment_received" not in text and f"{ch}: channel_open " in text
