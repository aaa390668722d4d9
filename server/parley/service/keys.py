"""API keys and the projects they belong to: the check every request passes.

A key is `sk-parley-` and 43 random URL-safe characters (256 bits). The store keeps its SHA-256
and never the key: a key that random needs no slow password hash, and a lookup by hash costs one
indexed read. Verified keys are cached for a few seconds, so a revocation reaches every replica
within KEY_CACHE_SECONDS.

Auth is on when `PARLEY_API_KEY` is set or a key was ever created in the store (revoking the last
one does not turn it off); otherwise every request belongs to the `default` project (the server
says so at start-up).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from parley.errors import ApiError, ErrorKind
from parley.ids import new_id
from parley.log import get_logger
from parley.store.base import DEFAULT_PROJECT, KeyRecord

log = get_logger(__name__)

KEY_PREFIX = "sk-parley-"
# How long a verified key, a refused one, and whether any key exists at all are remembered.
KEY_CACHE_SECONDS = 10.0
# last_used_at is written at most this often per key (a read per request, not a write).
TOUCH_INTERVAL_SECONDS = 60.0
# Projects are names in URLs, logs and metrics labels: short and plain.
PROJECT_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def check_project_name(project: str) -> str:
    if not 1 <= len(project) <= 64 or not set(project) <= PROJECT_NAME_CHARACTERS:
        raise ValueError(f"a project name is 1 to 64 letters, digits, '-', '_' or '.', got {project!r}")
    return project


async def create_key(store, project: str, name: str = "") -> tuple[str, KeyRecord]:
    """A new key for `project`: (the key, shown once; its stored record)."""
    key = new_key()
    record = KeyRecord(new_id("key"), check_project_name(project), name, time.time())
    await store.create_key(record, key_hash(key))
    return key, record


def missing_key() -> ApiError:
    # OpenAI's wording and shape for a request without a key.
    return ApiError(ErrorKind.UNAUTHENTICATED,
                    "You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", None, None)


def invalid_key() -> ApiError:
    # The key itself is never echoed, not even in part.
    return ApiError(ErrorKind.UNAUTHENTICATED, "Incorrect API key provided.", None, "invalid_api_key")


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Authenticator:
    """Which project a request's `Authorization` header belongs to, or 401."""

    def __init__(self, store, bootstrap_key: str = "", clock=time.monotonic):
        self.store = store
        self._bootstrap = key_hash(bootstrap_key) if bootstrap_key else None
        self._clock = clock
        self._verdicts: dict[bytes, tuple[str | None, str | None, float]] = {}  # hash -> (project, key id, until)
        self._touched: dict[str, float] = {}
        self._keys_exist: tuple[bool, float] = (False, -1.0)

    def forget(self) -> None:
        """Drop what is cached: keys created or revoked since are seen at the next request."""
        self._verdicts.clear()
        self._keys_exist = (False, -1.0)

    async def required(self) -> bool:
        if self._bootstrap is not None:
            return True
        exist, until = self._keys_exist
        if self._clock() >= until:
            exist = await self.store.has_keys()
            self._keys_exist = (exist, self._clock() + KEY_CACHE_SECONDS)
        return exist

    async def project_of(self, authorization: str | None) -> str:
        if not await self.required():
            return DEFAULT_PROJECT
        token = bearer_token(authorization)
        if token is None:
            raise missing_key()
        digest = key_hash(token)
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return DEFAULT_PROJECT
        now = self._clock()
        project, key_id, until = self._verdicts.get(digest, (None, None, -1.0))
        if now >= until:
            record = await self.store.key_by_hash(digest)
            usable = record is not None and record.revoked_at is None
            project, key_id = (record.project, record.id) if usable else (None, None)
            if len(self._verdicts) > 10_000:  # a flood of wrong keys must not grow this without bound
                self._verdicts.clear()
            self._verdicts[digest] = (project, key_id, now + KEY_CACHE_SECONDS)
        if project is None:
            raise invalid_key()
        if now - self._touched.get(key_id, -TOUCH_INTERVAL_SECONDS) >= TOUCH_INTERVAL_SECONDS:
            self._touched[key_id] = now
            try:
                await self.store.touch_key(key_id, time.time())
            except Exception:  # bookkeeping only: the request goes on
                log.warning("keys.touch_failed", key_id=key_id)
        return project
