"""Transports: how frames move between two nodes (see :mod:`.base` for the contract)."""
