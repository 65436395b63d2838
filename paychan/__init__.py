"""paychan: two-party, bidirectional, off-chain payment channels."""
from paychan.actors.clock import VirtualClock, WallClock
from paychan.actors.node import Payment
from paychan.api import EVENTS, Ledger, Node
from paychan.protocol import errors
from paychan.service import tune_gc

__all__ = ["EVENTS", "Ledger", "Node", "Payment", "VirtualClock", "WallClock", "errors",
           "tune_gc"]
