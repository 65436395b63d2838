"""A TCP relay on loopback whose connections a test cuts, as a network failure would."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


class Relay:
    """Relays each connection to 127.0.0.1:`target_port`. `cut(swallow_for)`: the connections
    of that moment swallow what passes for `swallow_for` seconds (the frames in flight are
    lost), then are closed; connections made meanwhile are relayed as usual, unless
    `refuse_new`: then each new one is closed on arrival until `restore()`."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.up = True
        self.conns: set[socket.socket] = set()
        self.doomed: set[socket.socket] = set()  # swallowing until the cut closes them
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            # Under the lock, so a cut never misses a connection being set up.
            with self.lock:
                try:
                    if not self.up:
                        raise ConnectionRefusedError
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                self.conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if src not in self.doomed:
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self, swallow_for: float = 0.0, refuse_new: bool = False) -> None:
        with self.lock:
            if refuse_new:
                self.up = False
            doomed, self.conns = self.conns, set()
            self.doomed |= doomed
        time.sleep(swallow_for)
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        with self.lock:
            self.doomed -= doomed

    def restore(self) -> None:
        with self.lock:
            self.up = True

    def close(self) -> None:
        self.server.close()
        self.cut()
