"""Unguessable ids with OpenAI's prefixes (resp_, msg_, fc_, call_, rs_)."""

import secrets

# A response id is `resp_` and 48 hex digits, like OpenAI's. The first AFFINITY_HEX of them are
# its chain's affinity tag: a response that continues another (previous_response_id) carries the
# tag of the one it continues, so every turn of a chain names the same tag, and Envoy can send a
# continuation to the replica that holds the chain's KV-cache prefix from the request alone
# (docs/gateway.md). The remaining 32 digits (128 bits) are random.
AFFINITY_HEX = 16
HEX = frozenset("0123456789abcdef")


def new_id(prefix: str) -> str:
    # 24 random bytes: 192 bits, hex like OpenAI's ids.
    return f"{prefix}_{secrets.token_hex(24)}"


def affinity_tag(response_id: str) -> str | None:
    """The chain tag a response id carries, if it is one of Parley's."""
    digits = response_id.removeprefix("resp_")
    tag = digits[:AFFINITY_HEX]
    return tag if len(digits) >= AFFINITY_HEX and set(tag) <= HEX else None


def chain_tag(response_id: str) -> str:
    """The digits every response id of a chain shares (unchecked, unlike affinity_tag: for an id
    from before chain tags, its own first digits), which SQL can take too (store.base.TAG_OF)."""
    return response_id[len("resp_"):len("resp_") + AFFINITY_HEX]


def new_response_id(continues: str | None = None) -> str:
    """A new response's id; `continues`: the id of the response it continues."""
    tag = (affinity_tag(continues) if continues else None) or secrets.token_hex(AFFINITY_HEX // 2)
    return f"resp_{tag}{secrets.token_hex(16)}"
