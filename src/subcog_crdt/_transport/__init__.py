"""Transports: how frames move between two nodes (see ``base`` for the contract)."""
