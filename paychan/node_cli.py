"""`paychan node run` (a long-running node daemon) and `paychan node pay` (a one-shot payer)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Any

from paychan.actors.ledger_client import LedgerUnreachable
from paychan.api import Ledger, Node, Payment
from paychan.protocol.errors import PaychanError
from paychan.service import tune_gc

log = logging.getLogger("paychan.daemon")

LOG_MESSAGE_CHARS = 500  # of one log message: peers choose some of what is logged


class BoundedFormatter(logging.Formatter):
    """Cuts a long message, so that a log line stays bounded: a peer's error text or message
    can be 64 KiB, and some of the node's lines quote them. Tracebacks are kept whole."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if len(record.message) > LOG_MESSAGE_CHARS:
            record.message = (f"{record.message[:LOG_MESSAGE_CHARS]}... "
                              f"({len(record.message)} chars)")
        return super().formatMessage(record)


def add_parser(sub: Any) -> None:
    node = sub.add_parser("node", help="run a node, or pay from one")
    verbs = node.add_subparsers(dest="verb", required=True)
    for verb, text in (("run", "a long-running node that serves paid calls (echo)"),
                       ("pay", "open (or reuse) a channel to a peer and pay it")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--data", required=True, help="the node's data folder")
        p.add_argument("--ledger", required=True, help="ledger URL (paychan ledger serve)")
        p.add_argument("--listen", default=None, help="http(s)://host:port to accept peers on")
        p.add_argument("--hub", default=None, help="chat hub URL to be reachable through")
        p.add_argument("--tls-cert", default=None)
        p.add_argument("--tls-key", default=None)
        p.add_argument("--tls-ca", default=None, help="CA file that peers' certificates chain to")
        p.add_argument("--wait-ledger", type=float, default=60.0 if verb == "run" else 0.0,
                       metavar="SECONDS",
                       help="how long to retry a ledger that does not answer yet (run: 60, "
                            "pay: 0)")
    verbs.choices["run"].add_argument(
        "--no-payment-log", action="store_true",
        help="no log line per payment received (a busy service writes thousands a second)")
    pay = verbs.choices["pay"]
    pay.add_argument("--peer", required=True, help="the peer's URL or pairing code")
    pay.add_argument("--deposit", type=int, default=1000, help="deposit of a new channel")
    pay.add_argument("--amount", type=int, default=1, help="amount of each payment")
    pay.add_argument("--count", type=int, default=1, help="payments to make")
    pay.add_argument("--message", default="hello", help="message sent with each payment")
    pay.add_argument("--mint", type=int, default=0, help="dev faucet: mint this much first")
    pay.add_argument("--close", action="store_true", help="close the channel afterwards")


class StopFlag:
    """Set from a signal handler, waited on by the main thread. A plain flag, polled: a
    threading.Event set from a handler deadlocks if the signal lands while the main thread
    holds the Event's own lock (inside its wait)."""

    POLL = 0.1

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; False when `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            left = self.POLL if deadline is None else min(self.POLL, deadline - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True


def _connect(url: str, wait: float, stopping: StopFlag) -> Ledger | None:
    """The ledger at `url`, retried with backoff for up to `wait` seconds: a daemon may well be
    started before (or while) its ledger server restarts. None when `stopping` is set first."""
    deadline = time.monotonic() + wait
    delay = 0.25
    while not stopping.is_set():
        try:
            return Ledger.connect(url)
        except LedgerUnreachable as exc:
            if stopping.is_set():
                break
            if time.monotonic() + delay > deadline:
                raise
            log.warning("ledger not answering (%s); retrying in %g s", exc, delay)
            if stopping.wait(delay):
                break
            delay = min(delay * 2, 5.0)
    return None


def _open(args: argparse.Namespace, stopping: StopFlag) -> Node | None:
    """The node, which owns (and closes) its ledger client; None when stopped first."""
    ledger = _connect(args.ledger, args.wait_ledger, stopping)
    if ledger is None:
        return None
    try:
        node = Node.open(args.data, ledger=ledger, listen=args.listen, hub=args.hub,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)
    except BaseException:
        ledger.close()
        raise
    node._owned_ledger = ledger
    return node


def main(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(BoundedFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.verb == "run" else logging.WARNING,
                        handlers=[handler])
    if args.verb == "run" and not args.no_payment_log:
        # The node logs each channel event at INFO, a payment at DEBUG on its own logger
        # (applications making many calls want it off); a daemon's log has a line for each.
        logging.getLogger("paychan.payments").setLevel(logging.DEBUG)
    try:
        return run(args) if args.verb == "run" else pay(args)
    except (PaychanError, OSError) as exc:
        # A clear line, not a traceback: the error says what failed (e.g. a port in use).
        print(f"paychan node {args.verb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then stop cleanly (actors, transports, store)."""
    stopping = StopFlag()
    # Before opening: a signal while the ledger is awaited (or the store recovers) must stop
    # the daemon cleanly too, not kill it or end it in a KeyboardInterrupt traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    node = _open(args, stopping)
    if node is None:
        log.info("stopping")
        return 0

    def echo(p: Payment) -> dict[str, Any]:
        return {"echo": p.message, "amount": p.amount}

    node.on_payment_received(echo, quick=True)  # it only builds a dict
    tune_gc()  # a daemon: what startup built lives as long as the process
    print(f"node {node.address} running", flush=True)
    try:
        code = node.pairing_code
        print(f"pairing code {code}", flush=True)
    except Exception:  # no hub: peers reach us by URL
        pass
    stopping.wait()
    log.info("stopping")
    node.stop()
    return 0


def _ctrl_c_sets(stopping: StopFlag) -> Any:
    """The first Ctrl-C asks to stop at the next step; a second one interrupts at once. (A
    KeyboardInterrupt in the middle of a call would stop the channel it was working for, which
    then restarts from its store: safe, but noisy in the log.) Returns the handler it replaced."""
    def first(*_: Any) -> None:
        stopping.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return signal.signal(signal.SIGINT, first)


def pay(args: argparse.Namespace) -> int:
    stopping = StopFlag()
    before = _ctrl_c_sets(stopping)
    try:
        return _pay(args, stopping)
    finally:
        if before is not None:  # None: a handler not set from Python, nothing to put back
            signal.signal(signal.SIGINT, before)  # for a caller of paychan.cli.main in-process


def _pay(args: argparse.Namespace, stopping: StopFlag) -> int:
    node = _open(args, stopping)
    if node is None:
        return _interrupted()
    with node:
        # Before each step that moves money or may wait long: a Ctrl-C that came meanwhile
        # stops here rather than mint, lock a deposit or pay once more.
        if stopping.is_set():
            return _interrupted()
        if args.mint:
            with Ledger.connect(args.ledger) as faucet:
                faucet.mint(node.address, args.mint)
        need = args.amount * args.count
        ch = next((c for c in node.channels(args.peer)
                   if node.balances(c)["status"] == "open"
                   and node.balances(c)["my_balance"] >= need), None)
        if ch is None:
            if stopping.is_set():
                return _interrupted()
            ch = node.create_channel(args.peer, args.deposit)
            print(f"opened {ch}", flush=True)
        for _ in range(args.count):
            if stopping.is_set():
                break
            reply = node.send_message_and_pay(ch, args.message, args.amount)
            print(json.dumps(reply, default=str), flush=True)
        if stopping.is_set():
            return _interrupted()
        print(json.dumps(node.balances(ch)), flush=True)
        if args.close:
            node.close(ch)
            print("closed", flush=True)
    return 0


def _interrupted() -> int:
    print("paychan node pay: interrupted", file=sys.stderr)
    return 130
