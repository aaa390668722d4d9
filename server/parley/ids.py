"""Unguessable ids with OpenAI's prefixes (resp_, msg_, fc_, call_, rs_)."""

import secrets


def new_id(prefix: str) -> str:
    # 24 random bytes: 192 bits, hex like OpenAI's ids.
    return f"{prefix}_{secrets.token_hex(24)}"
