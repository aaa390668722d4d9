"""Encrypted reasoning for stateless multi-turn: AES-256-GCM with a server key.

`include: ["reasoning.encrypted_content"]` returns reasoning sealed so only a Parley with the
same key can open it; clients send it back as input with `store: false`. The blob is
authenticated as a whole, with a version tag as associated data. It is not bound to a response
id, because the request that sends it back has a new one.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

import orjson

from parley.errors import invalid
from parley.log import get_logger

log = get_logger(__name__)

VERSION = b"parley-reasoning-v1"
# A compaction item's summary, sealed under its own tag: one kind of blob never opens as the other.
COMPACTION = b"parley-compaction-v1"


def load_key(configured: str, key_file: Path) -> bytes:
    """PARLEY_REASONING_KEY (base64, 32 bytes) if set; else a key file created once, mode 0600."""
    if configured:
        key = base64.urlsafe_b64decode(configured + "=" * (-len(configured) % 4))
        if len(key) != 32:
            raise ValueError("reasoning_key must be 32 bytes, base64-encoded")
        return key
    if key_file.is_file():
        return key_file.read_bytes()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    log.warning("reasoning_key.generated", path=str(key_file),
                detail="set PARLEY_REASONING_KEY to share one key across replicas")
    return key


class Sealer:
    def __init__(self, key: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)

    def seal(self, content: list[dict], purpose: bytes = VERSION) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, orjson.dumps(content), purpose)
        return base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, blob: str, param: str, purpose: bytes = VERSION) -> list[dict]:
        from cryptography.exceptions import InvalidTag

        try:
            raw = base64.urlsafe_b64decode(blob.encode())
            return orjson.loads(self._aead.decrypt(raw[:12], raw[12:], purpose))
        except (InvalidTag, ValueError, orjson.JSONDecodeError):
            raise invalid("The encrypted content could not be verified: it was not produced by this server's key "
                          "or was modified.", param, "invalid_encrypted_content") from None
