"""paychan: two-party, bidirectional, off-chain payment channels."""
