"""What a transport is to a node, the loopback one, and the routes the node learned per peer."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from paychan.actors.loopback import LoopbackNetwork
from paychan.protocol.errors import PaychanError
from paychan.storage.env import Store
from paychan.storage.keys import pack, unpack
from paychan.storage.writer import Put

log = logging.getLogger("paychan.transport")

PEERS = "peers"

# deliver(envelope, route): `route` is how to answer the sender (e.g. {"via": "http", "url": ...})
Deliver = Callable[[bytes, dict[str, Any] | None], "PaychanError | None"]


class Transport(Protocol):
    """Moves sealed envelopes. `send` never blocks the caller; losses are repaired by sync."""

    name: str

    def start(self, deliver: Deliver) -> None: ...
    def can_reach(self, peer: bytes, route: dict[str, Any] | None) -> bool: ...
    def send(self, peer: bytes, envelope: bytes, route: dict[str, Any] | None) -> None: ...
    def close(self) -> None: ...


class OwnLoop:
    """A transport with an event loop of its own (on its own thread), carrying only this
    node's traffic: the node lets that loop write its commits itself (Writer.write_on)."""

    _loop: asyncio.AbstractEventLoop
    writes_on_loop = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop


class LoopbackTransport:
    """Nodes in one process, through a LoopbackNetwork."""

    name = "loopback"

    def __init__(self, network: LoopbackNetwork, address: bytes) -> None:
        self.network = network
        self.address = address
        self.on_reconnect: Callable[[bytes], None] | None = None

    def start(self, deliver: Deliver) -> None:
        self.network.attach(self.address, lambda envelope: _ignore(deliver(envelope, None)),
                            self._peer_back)

    def _peer_back(self, peer: bytes) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect(peer)

    def can_reach(self, peer: bytes, route: dict[str, Any] | None) -> bool:
        return (route is None or route.get("via") == "loopback") and self.network.is_attached(peer)

    def send(self, peer: bytes, envelope: bytes, route: dict[str, Any] | None) -> None:
        self.network.send(peer, envelope)

    def close(self) -> None:
        self.network.detach(self.address)


class Routes:
    """How to reach each peer, persisted in the `peers` database."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[bytes, dict[str, Any] | None] = {}

    def get(self, peer: bytes) -> dict[str, Any] | None:
        if peer not in self._cache:
            raw = self.store.get(PEERS, peer)
            self._cache[peer] = None if raw is None else unpack(raw)
        return self._cache[peer]

    def learn(self, peer: bytes, route: dict[str, Any]) -> None:
        if self.get(peer) == route:
            return
        self._cache[peer] = route
        self.store.writer.submit([Put(PEERS, peer, pack(route))])
        log.info("route to %s: %s", peer.hex()[:12], route)


def _ignore(result: object) -> None:
    """Loopback has nobody to answer: refusals are already logged by the node."""
