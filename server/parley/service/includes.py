"""`include` on stored items (GET /v1/responses/{id}, conversation items): their optional parts.

A stored document keeps everything its create asked for. A read returns the optional parts it
names and leaves out those it does not: token logprobs (`message.output_text.logprobs`) and
sealed reasoning (`reasoning.encrypted_content`, sealed on the way out when the create did not
ask for it). The other documented values name output of hosted tools that this server never
produces, so there is nothing to add for them.
"""

from __future__ import annotations

from parley.errors import ApiError, ErrorKind
from parley.service.sealing import Sealer
from parley.service.validation import validate_include

LOGPROBS = "message.output_text.logprobs"
ENCRYPTED_REASONING = "reasoning.encrypted_content"


def shape_stored(document: dict, include: list[str], sealer: Sealer | None) -> dict:
    """`document` (a fresh copy, changed in place) with the optional parts `include` asks for."""
    shape_items(document.get("output") or [], include, sealer)
    return document


def checked_include(include: list[str], sealer: Sealer | None) -> list[str]:
    """`include` if this server can honour it on stored items; else a 400 naming it."""
    include = validate_include(include)
    if ENCRYPTED_REASONING in include and sealer is None:
        raise ApiError(ErrorKind.INVALID_REQUEST, "Encrypted reasoning is not configured on this server.",
                       "include", "unsupported_value")
    return include


def shape_items(items: list[dict], include: list[str], sealer: Sealer | None) -> list[dict]:
    """Stored items (fresh copies, changed in place) with the optional parts `include` asks for."""
    include = checked_include(include, sealer)
    for item in items:
        if item.get("type") == "message" and LOGPROBS not in include:
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    part["logprobs"] = []
        elif item.get("type") == "reasoning":
            if ENCRYPTED_REASONING not in include:
                item.pop("encrypted_content", None)
            elif item.get("content") and not item.get("encrypted_content"):
                item["encrypted_content"] = sealer.seal(item["content"])
    return items
