"""Kill -9 at a random moment: every write whose future completed is in the store afterwards."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from paychan.storage.env import Store
from paychan.storage.keys import u64

CHILD = textwrap.dedent("""
    import sys, threading
    from paychan.storage.env import Store
    from paychan.storage.writer import Append, Put

    store = Store.open(sys.argv[1])
    writer = store.writer
    round_ = sys.argv[2]
    out = threading.Lock()

    def report(key, t, seq):
        with out:
            sys.stdout.write("%s %d %d\\n" % (key.decode(), t, seq))
            sys.stdout.flush()

    def client(t):
        prefix = b"log-%d" % t
        i = 0
        while True:
            key = ("%s-%d-%d" % (round_, t, i)).encode()
            future = writer.submit([Put("kv", key, key), Append("payments", prefix, key)])
            # Even clients wait on the future, odd ones report from its callback (on the
            # writer thread): both must only ever see durable data.
            if t % 2 == 0:
                report(key, t, future.result()[0])
            else:
                done = threading.Event()
                future.add_done_callback(
                    lambda f, key=key: (report(key, t, f.result()[0]), done.set()))
                done.wait()
            i += 1

    print("ready", flush=True)
    for t in range(4):
        threading.Thread(target=client, args=(t,), daemon=True).start()
    threading.Event().wait()
""")


def run_and_kill(path: Path, round_: int, rng: random.Random) -> list[str]:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(round_)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(child.pid, signal.SIGKILL)
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL, err
    # A line cut short by the kill was never fully acknowledged; only whole lines count.
    return out.split("\n")[:-1]


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "data"
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    acknowledged: list[str] = []
    for round_ in range(3):
        lines = run_and_kill(path, round_, rng)
        assert lines, f"the child acknowledged nothing before the kill (seed {seed})"
        acknowledged += lines

        store = Store.open(path)
        try:
            for line in acknowledged:
                key, t, seq = line.split(" ")
                assert store.get("kv", key.encode()) == key.encode(), f"lost {key} (seed {seed})"
                entry = store.get("payments", b"log-%d" % int(t) + u64(int(seq)))
                assert entry == key.encode(), f"lost log entry of {key} (seed {seed})"
        finally:
            store.close()
