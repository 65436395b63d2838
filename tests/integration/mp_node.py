"""A node in its own process for the multi-process tests, driven by lines on stdin.

    python mp_node.py --data DIR --ledger URL [--listen URL] [--hub URL] [COMMAND ...]

It opens `paychan.Node` on DIR, answers every paid call with `{"echo": message, "amount": n}`,
prints `READY <address> <pairing code or ->`, then runs each COMMAND given as an argument
(one string each) and every line read from stdin. Each command runs on its own thread, so a
storm or a close waiting for the ledger does not hold up the next command; `quit` stops the
node cleanly and exits. Every output line is written and flushed whole, so a SIGKILL leaves at
most one cut line, which carries no newline and is ignored by the reader.

    open PEER DEPOSIT [DISPUTE]        -> OPENED <ch>        (PEER: a URL or a pairing code)
    deposit CH AMOUNT                  -> DEPOSITING <ch> once its ledger transaction is a
                                          persisted task, DEPOSITED <ch> once the ledger has it
                                          (waits until the channel is open here first)
    storm CH N AMOUNT PREFIX [START [TIMEOUT]]
                                       -> ACK <pid> <amount> after each acknowledged payment of
                                          ids PREFIX-START .. PREFIX-(N-1), then STORMED PREFIX;
                                          each call waits TIMEOUT seconds (2) before its retry
    halt PREFIX                        -> HALTED <prefix> <next index>: the storm stops once its
                                          payment in flight is acknowledged
    pay CH AMOUNT PID TIMEOUT MESSAGE  -> PAID <pid> <json reply>  (one call, no retry)
    message CH TEXT                    -> SENT <ch>          (a free message; the peer prints
                                          MSG <ch> <json body>)
    sync CH                            -> SYNCED <ch>
    balances CH                        -> BALANCES <ch> <json>  (Node.balances, plus in_flight,
                                          serving and postponed counts)
    pending                            -> PENDING <n>: envelopes the hub has not stored yet
    close CH mutual|solo               -> CLOSED <ch> <json>  (waits until the ledger paid out)
    quit                               -> BYE, exit 0

A storm retries a payment id on Timeout (printing RETRY <pid>) until it is answered, so each
id is paid exactly once; any other error prints PAYERR <pid> <error> and is retried too. A
failed command prints `ERR <verb> <error>`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

import paychan
from paychan.protocol.errors import PaychanError, Timeout
from paychan.protocol.identity import decode_channel_id

_out = threading.Lock()


def say(line: str) -> None:
    data = (line + "\n").encode()
    with _out:  # whole lines, unbuffered: a kill cuts at most the line being written
        while data:
            data = data[os.write(1, data):]


def as_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class Daemon:
    def __init__(self, node: paychan.Node) -> None:
        self.node = node
        self.halted: set[str] = set()
        self.done = threading.Event()

    # -- commands --------------------------------------------------------------------------
    def open(self, peer: str, deposit: str, dispute: str = "600") -> None:
        ch = self.node.create_channel(peer, int(deposit), dispute_period=int(dispute))
        say(f"OPENED {ch}")

    def deposit(self, ch: str, amount: str) -> None:
        self._wait(lambda: self._known(ch) and self.node.balances(ch)["status"] == "open",
                   f"{ch} is open here")
        before = self.node.balances(ch)["deposited_by_me"]
        self.node.deposit(ch, int(amount), wait=False)
        say(f"DEPOSITING {ch}")
        self._wait(lambda: self.node.balances(ch)["deposited_by_me"] >= before + int(amount),
                   f"the ledger confirms the deposit to {ch}")
        say(f"DEPOSITED {ch}")

    def storm(self, ch: str, n: str, amount: str, prefix: str, start: str = "0",
              timeout: str = "2") -> None:
        i = int(start)
        while i < int(n) and prefix not in self.halted:
            pid = f"{prefix}-{i}"
            while True:
                try:
                    reply = self.node.send_message_and_pay(ch, pid, int(amount),
                                                           timeout=float(timeout),
                                                           payment_id=pid)
                    break
                except Timeout:
                    say(f"RETRY {pid}")  # the same id again: it never pays twice
                except PaychanError as exc:
                    say(f"PAYERR {pid} {type(exc).__name__}: {exc}")
                    time.sleep(0.2)
            if reply != {"echo": pid, "amount": int(amount)}:
                say(f"BADREPLY {pid} {as_json(reply)}")
            say(f"ACK {pid} {amount}")
            i += 1
        say(f"HALTED {prefix} {i}" if prefix in self.halted else f"STORMED {prefix}")

    def halt(self, prefix: str) -> None:
        self.halted.add(prefix)

    def pay(self, ch: str, amount: str, pid: str, timeout: str, message: str) -> None:
        reply = self.node.send_message_and_pay(ch, message, int(amount),
                                               timeout=float(timeout), payment_id=pid)
        say(f"PAID {pid} {as_json(reply)}")

    def message(self, ch: str, text: str) -> None:
        self.node.send_message(ch, text)
        say(f"SENT {ch}")

    def sync(self, ch: str) -> None:
        self.node.sync(ch)
        say(f"SYNCED {ch}")

    def balances(self, ch: str) -> None:
        state = self.node._core.state(decode_channel_id(ch))
        info = {**self.node.balances(ch), "in_flight": len(state.outgoing),
                "serving": len(state.serving), "postponed": len(state.postponed)}
        say(f"BALANCES {ch} {as_json(info)}")

    def pending(self) -> None:
        chat = self.node._core.transport("chat")
        say(f"PENDING {len(getattr(chat, '_pending', ()))}")

    def close(self, ch: str, how: str) -> None:
        if how not in ("mutual", "solo"):
            raise ValueError("close CH mutual|solo")
        result = self.node.close(ch, mutual=how == "mutual", wait=True, timeout=120)
        say(f"CLOSED {ch} {as_json(result)}")

    # -- plumbing --------------------------------------------------------------------------
    def _known(self, ch: str) -> bool:
        return ch in self.node.channels()

    @staticmethod
    def _wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting until {what}")
            time.sleep(0.05)

    def run(self, line: str) -> None:
        words = line.split(" ", 5) if line.startswith("pay ") else line.split()
        if not words:
            return
        verb, args = words[0], words[1:]
        if verb == "message":
            args = line.split(" ", 2)[1:]
        if verb == "quit":
            self.done.set()
            return
        fn = getattr(self, verb, None) if not verb.startswith("_") and verb != "run" else None
        if fn is None:
            say(f"ERR {verb} unknown command")
            return
        threading.Thread(target=self._call, args=(verb, fn, args), daemon=True,
                         name=f"cmd-{verb}").start()

    @staticmethod
    def _call(verb: str, fn: Any, args: list[str]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            traceback.print_exc()
            say(f"ERR {verb} {type(exc).__name__}: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--listen", default=None)
    parser.add_argument("--hub", default=None)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("commands", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    logging.getLogger("pykka").setLevel(logging.WARNING)
    # The handler is set at open: calls resumed by the recovery inside open need it.
    node = paychan.Node.open(args.data, ledger=args.ledger, listen=args.listen, hub=args.hub,
                             on_payment_received=lambda p: {"echo": p.message,
                                                            "amount": p.amount})
    node.on("message", lambda e: say(f"MSG {e['channel_id']} {as_json(e['body'])}"))
    daemon = Daemon(node)
    code = node.pairing_code if args.hub else "-"
    say(f"READY {node.address} {code}")
    for command in args.commands:
        daemon.run(command)

    def read_stdin() -> None:
        for line in sys.stdin:
            daemon.run(line.strip())
        daemon.done.set()  # the parent closed our stdin (or died): stop
    threading.Thread(target=read_stdin, daemon=True, name="stdin").start()
    daemon.done.wait()
    node.stop()
    say("BYE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
