"""kill -9 at random moments (DESIGN §9): no acknowledged payment is lost, both sides agree after
restart and sync, a close and a dispute cut short by a kill finish with the right payouts.

The nodes and the ledger live in a child process (crash_child.py) on LMDB in tmp_path; the
test SIGKILLs it and starts it again on the same folders. PAYCHAN_CRASH_SEED replays a run's
kill delays (the seed is printed), PAYCHAN_CRASH_KILLS sets how many kills the storm takes.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import crash_child

CHILD = Path(__file__).with_name("crash_child.py")
ROOT = Path(__file__).resolve().parents[2]


def crash_seed() -> int:
    seed = int(os.environ.get("PAYCHAN_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    print(f"crash seed {seed} (PAYCHAN_CRASH_SEED={seed} replays the kill delays)")
    return seed


class Child:
    """One run of crash_child.py; complete stdout lines are collected as they arrive."""

    def __init__(self, root: Path, *args: str) -> None:
        self.args = args
        self.err_path = root.parent / f"{root.name}-{'-'.join(args)}-{time.monotonic_ns()}.err"
        self._err = open(self.err_path, "w")  # closed in _reap
        self.proc = subprocess.Popen([sys.executable, str(CHILD), str(root), *args],
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     cwd=ROOT)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.endswith("\n"):  # a line cut by the kill was never acknowledged
                self.lines.append(line.rstrip("\n"))
                self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no {prefix!r} line from {self.args} in {timeout} s"
                                     f"{self.stderr_tail()}") from None
            if line is None:
                self._reap()
                raise AssertionError(f"{self.args} exited ({self.proc.returncode}) before "
                                     f"printing {prefix!r}{self.stderr_tail()}")
            if line.startswith(prefix):
                return line

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, then read what the child had flushed before it died."""
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self._reap()
        assert self.proc.returncode == -signal.SIGKILL, self.stderr_tail()

    def finish(self, timeout: float = 90.0) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.args} did not finish in {timeout} s"
                                 f"{self.stderr_tail()}") from None
        self._reap()
        return self.proc.returncode

    def result(self, timeout: float = 90.0) -> dict:
        """The JSON line a finishing mode prints last."""
        rc = self.finish(timeout)
        assert rc == 0, f"{self.args} exited with {rc}{self.stderr_tail()}"
        return json.loads(self.lines[-1])

    def _reap(self) -> None:
        self.proc.wait(30)
        self._reader.join(30)
        self._err.close()

    def stderr_tail(self, n: int = 30) -> str:
        self._err.flush()
        tail = self.err_path.read_text().splitlines()[-n:]
        return "\n--- child stderr ---\n" + "\n".join(tail) if tail else ""


def acks_of(lines: list[str]) -> list[tuple[str, str, int]]:
    out = []
    for line in lines:
        if line.startswith("ACK "):
            _, payer, pid, amount = line.split()
            out.append((payer, pid, int(amount)))
    return out


def cut_short(run: int, acks: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The payment each storm thread had in flight when the kill came: the one after its
    last acknowledged (ids are `<payer>-<run>-<thread>-<i>`)."""
    done: dict[tuple[str, int], int] = {}
    for payer, pid, _ in acks:
        _, _, thread, i = pid.split("-")
        done[(payer, int(thread))] = max(done.get((payer, int(thread)), -1), int(i))
    out = []
    for payer in ("a", "b"):
        for thread in range(crash_child.THREADS_PER_PAYER):
            i = done.get((payer, thread), -1) + 1
            out.append((payer, f"{payer}-{run}-{thread}-{i}", crash_child.amount_of(thread, i)))
    return out


def storm_then_kill(root: Path, run: int, delay: float) -> Child:
    child = Child(root, "storm", str(run))
    child.wait_line("READY")
    time.sleep(delay)
    assert child.alive(), f"the storm stopped by itself{child.stderr_tail()}"
    child.kill()
    return child


def test_payment_storm_survives_kill_9(tmp_path):
    started = time.monotonic()
    rng = random.Random(crash_seed())
    kills = int(os.environ.get("PAYCHAN_CRASH_KILLS", "20"))
    root = tmp_path / "world"
    acked: dict[str, tuple[str, int]] = {}
    cut: list[tuple[str, str, int]] = []
    per_run = []
    for run in range(kills):
        child = storm_then_kill(root, run, rng.uniform(0.2, 1.5))
        problems = [x for x in child.lines if x.startswith(("ERR", "BADREPLY"))]
        assert not problems, problems[:10]
        run_acks = acks_of(child.lines)
        for payer, pid, amount in run_acks:
            assert pid not in acked, f"payment id {pid} acknowledged twice"
            acked[pid] = (payer, amount)
        per_run.append(len(run_acks))
        cut += cut_short(run, run_acks)
    assert sum(per_run) > 0 and sum(1 for n in per_run if n) >= kills // 2, per_run
    by_payer = Counter()
    for payer, amount in acked.values():
        by_payer[payer] += amount
    assert by_payer["a"] > 0 and by_payer["b"] > 0, by_payer

    crash_child.write_json(str(root / "acked.json"),
                           [[payer, pid, amount] for pid, (payer, amount) in acked.items()])
    crash_child.write_json(str(root / "cut.json"), cut)
    report = Child(root, "verify").result()
    a, b = report["balances"]["a"], report["balances"]["b"]
    # Both sides agree on what each one sent.
    assert a["sent_by_me"] == b["sent_by_peer"] and b["sent_by_me"] == a["sent_by_peer"], report
    # No acknowledged payment is lost (unacknowledged ones in flight at a kill may count too).
    assert a["sent_by_me"] >= by_payer["a"], (a, by_payer)
    assert b["sent_by_me"] >= by_payer["b"], (b, by_payer)
    # Retrying every acknowledged id returns its stored reply and pays nothing more.
    assert report["retried"] == len(acked)
    assert report["wrong_replies"] == []
    assert report["after_retries"] == report["balances"]
    # ... and nothing is counted twice: beyond the acknowledged, at most what was in flight.
    in_flight = kills * crash_child.THREADS_PER_PAYER * crash_child.MAX_AMOUNT
    assert a["sent_by_me"] - by_payer["a"] <= in_flight, (a, by_payer)
    assert b["sent_by_me"] - by_payer["b"] <= in_flight, (b, by_payer)
    assert a["my_balance"] + b["my_balance"] == crash_child.DEPOSIT_A + crash_child.DEPOSIT_B
    # The payments the kills cut short were answered by the handler, like any other.
    assert report["wrong_cut"] == 0, (report["cut"], report["wrong_cut_replies"])

    closed = Child(root, "close").result()
    assert closed["close_mutual_events"] == 1, closed
    before, after = closed["expect"]["ledger_before"], closed["ledger_after"]
    paid = {n: after[n] - before[n] for n in ("a", "b")}
    final = report["final"]
    assert paid == {"a": final["a"]["my_balance"], "b": final["b"]["my_balance"]}, closed
    assert sum(paid.values()) == crash_child.DEPOSIT_A + crash_child.DEPOSIT_B
    print(f"{kills} kills, {len(acked)} acknowledged payments (a paid {by_payer['a']}, "
          f"b paid {by_payer['b']}), acks per run {per_run}, verify sync rounds "
          f"{report['sync_rounds']}, {len(cut)} payments cut short and retried, "
          f"{time.monotonic() - started:.1f} s")


def test_kill_during_mutual_close(tmp_path):
    rng = random.Random(crash_seed())
    root = tmp_path / "world"
    storm_then_kill(root, 0, 1.0)  # leaves payments in flight for the close to wait out
    resumed, kills = [], 0
    hop = crash_child.CLOSE_HOP
    for _ in range(8):
        child = Child(root, "close")
        resumed.append(child.wait_line("RESUME"))
        half_done = any(r.startswith("RESUME closing 1") for r in resumed)
        if kills < 4 and resumed[-1].split()[2] == "1":  # not settled yet: kill inside it
            child.wait_line("CLOSING")
            # Before the peer has the proposal until a run has found the close half done;
            # then around the peer's co-signature and its submission.
            time.sleep(rng.uniform(0.05, hop - 0.05) if not half_done else
                       rng.uniform(hop - 0.05, hop + 0.15))
            if child.alive():
                child.kill()
                kills += 1
                continue
        closed = child.result()
        break
    else:
        raise AssertionError(f"the close never finished: {resumed}")
    # At least one kill landed inside the close: the next run found it half done.
    assert kills >= 1 and any(r.startswith("RESUME closing 1") for r in resumed), resumed
    assert closed["close_mutual_events"] == 1, closed
    expect, before, after = closed["expect"], closed["expect"]["ledger_before"], closed[
        "ledger_after"]
    paid = {n: after[n] - before[n] for n in ("a", "b")}
    assert paid == closed["payouts"] == {"a": expect["a"], "b": expect["b"]}, closed
    assert sum(paid.values()) == crash_child.DEPOSIT_A + crash_child.DEPOSIT_B
    print(f"{kills} kills during the close; runs resumed as {resumed}")


def test_kill_during_dispute(tmp_path):
    root = tmp_path / "world"
    storm_then_kill(root, 0, 0.8)
    for kill_at in ("landed", "task", "returned"):
        cheat = Child(root, "cheat", kill_at)
        cheat.wait_line("CHEATING")
        assert cheat.finish() == -signal.SIGKILL, cheat.stderr_tail()
        report = Child(root, "dispute").result()
        info = report["cheat"]
        total = info["deposit_a"] + info["deposit_b"]
        if kill_at != "returned":  # (after the submit returned, the victim might be quicker)
            # The stale close was still open when the victim came back, with a second to go.
            assert report["status_at_reopen"] == "closing", report
            assert report["now"] < report["window_ends"], report
        assert info["b_sent"] > 0  # b really sent something, and declared 0
        # The victim's watcher proved fraud and took the whole channel.
        assert report["settled_by"] == "fraud_proof" and report["settled_by_a"], report
        paid_a = report["ledger_after"]["a"] - info["ledger_before"]["a"]
        paid_b = report["ledger_after"]["b"] - info["ledger_before"]["b"]
        assert (paid_a, paid_b) == (total, 0), report
        if kill_at == "landed":  # killed before either node heard of the close
            assert report["victim_tasks_at_reopen"] == [], report
        if kill_at == "task":  # killed with the victim's decision persisted, not submitted
            assert report["victim_tasks_at_reopen"] == ["fraud_proof"], report
        print(f"killed at {kill_at!r}: victim's tasks at reopen "
              f"{report['victim_tasks_at_reopen']}, fraud proven in period {report['period']}")
