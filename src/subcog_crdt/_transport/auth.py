"""Handshake cryptography for the mesh: pure functions, no I/O.

Two nodes that share a mesh secret prove it to each other with a challenge-response
handshake. Each side sends a fresh random nonce; each side then answers with an
HMAC-SHA256 *proof* over a transcript that binds

- the role of the prover (``client`` or ``server``), so a proof obtained from one side can
  never be reflected back as the other side's proof,
- both nonces, so a recorded handshake cannot be replayed (the other side's nonce is new
  every time), and
- both node ids, so a proof cannot be relayed to a conversation between other nodes.

The secret itself never crosses the wire. Without a secret (loopback-only mode) proofs are
empty byte strings; the transport enforces the loopback restriction instead.

:func:`mesh_tag` gives a one-way, public label of a secret for discovery adverts, so that
nodes can skip peers of other meshes without revealing anything useful about the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "NONCE_SIZE",
    "Binding",
    "Role",
    "make_nonce",
    "make_proof",
    "mesh_tag",
    "verify_proof",
]

NONCE_SIZE = 32
"""Bytes of randomness per nonce; 256 bits make a repeated nonce practically impossible."""

Role = Literal["client", "server"]

_PROOF_LABEL = b"subcog-crdt handshake v1"
_TAG_LABEL = b"subcog-crdt mesh tag v1"


def make_nonce() -> bytes:
    """A fresh nonce from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def _field(data: bytes) -> bytes:
    # Length-prefix every field so that no two different transcripts serialise alike
    # (node ids are attacker-chosen strings of any length).
    return len(data).to_bytes(4, "big") + data


@dataclass(frozen=True)
class Binding:
    """What one handshake's proofs are bound to: both nonces and both node ids."""

    client_nonce: bytes
    server_nonce: bytes
    client_id: str
    server_id: str

    def transcript(self, role: Role) -> bytes:
        """The bytes a ``role`` proof is computed over (unambiguous, length-prefixed)."""
        return b"".join(
            (
                _field(_PROOF_LABEL),
                _field(role.encode()),
                _field(self.client_nonce),
                _field(self.server_nonce),
                _field(self.client_id.encode()),
                _field(self.server_id.encode()),
            )
        )


def make_proof(secret: bytes | None, role: Role, binding: Binding) -> bytes:
    """The proof that ``role`` knows ``secret`` in this handshake (``b""`` without secret)."""
    if secret is None:
        return b""
    return hmac.new(secret, binding.transcript(role), hashlib.sha256).digest()


def verify_proof(secret: bytes | None, role: Role, proof: bytes, binding: Binding) -> bool:
    """Check a peer's proof in constant time.

    Without a secret only an empty proof is accepted: a node that sends a proof expects a
    secret we do not have, and we must not pretend to share a mesh with it.
    """
    return hmac.compare_digest(make_proof(secret, role, binding), proof)


def mesh_tag(secret: bytes) -> str:
    """A short public label of ``secret`` for discovery adverts.

    HMAC keyed by the secret over a fixed label: equal for nodes of one mesh, unrelated to
    the secret otherwise (no dictionary shortcut beyond guessing the whole secret). It only
    lets a node skip peers of other meshes; it authenticates nothing.
    """
    return hmac.new(secret, _TAG_LABEL, hashlib.sha256).hexdigest()[:16]
