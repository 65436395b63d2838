"""Peer envelopes: NaCl Boxes from sender to recipient, one cached Box per peer (DESIGN §3)."""
from __future__ import annotations

import threading

import msgpack
from nacl.exceptions import CryptoError
from nacl.public import Box, PublicKey
from nacl.signing import VerifyKey

from paychan.protocol.errors import BadSignature, DecodeError, Unauthorized
from paychan.protocol.identity import KEY_LEN, Identity
from paychan.protocol.wire import MAX_FRAME, unpack

MAGIC = "pc1"


class Sealer:
    """Seals payloads for peers and opens what peers sealed for us."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self._private = identity.signing_key.to_curve25519_private_key()
        self._boxes: dict[bytes, Box] = {}
        self._lock = threading.Lock()

    def _box(self, peer: bytes) -> Box:
        box = self._boxes.get(peer)
        if box is None:
            try:
                curve = VerifyKey(peer).to_curve25519_public_key()
            except Exception:
                raise Unauthorized("peer key is not a valid Ed25519 public key") from None
            box = Box(self._private, PublicKey(bytes(curve)))
            with self._lock:
                self._boxes[peer] = box
        return box

    def seal(self, peer: bytes, payload: bytes) -> bytes:
        ciphertext = self._box(peer).encrypt(payload)
        return msgpack.packb([MAGIC, self.identity.public, peer, bytes(ciphertext)],
                             use_bin_type=True)

    def open(self, envelope: bytes) -> tuple[bytes, bytes]:
        """(sender, payload); DecodeError for junk, Unauthorized for another key's envelope."""
        obj = unpack(envelope, MAX_FRAME + 1024)
        if (not isinstance(obj, list) or len(obj) != 4 or obj[0] != MAGIC
                or not isinstance(obj[1], bytes) or len(obj[1]) != KEY_LEN
                or not isinstance(obj[2], bytes) or not isinstance(obj[3], bytes)):
            raise DecodeError("not a paychan envelope")
        _, sender, recipient, ciphertext = obj
        if recipient != self.identity.public:
            raise Unauthorized("envelope is addressed to another key")
        try:
            payload = self._box(sender).decrypt(ciphertext)
        except CryptoError:
            raise BadSignature("envelope does not open: forged or corrupted") from None
        return sender, payload
