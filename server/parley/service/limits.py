"""Per-project rate limits: requests and tokens per minute, answered as OpenAI answers them.

Each project has two token buckets, refilled continuously: one of requests, one of tokens. A
create takes one request and, for tokens, its prompt plus its output budget (OpenAI's estimate
too); when it ends, what it did not use goes back. A bucket that cannot cover a request refuses
it: 429 `rate_limit_exceeded`. Every reply to a project carries the `x-ratelimit-*` headers.

The buckets live in each replica's memory: with N replicas behind one Envoy, a project can use
up to N times the limits (docs/operations.md says how to set them).
"""

from __future__ import annotations

import math
import time

from parley.errors import ApiError, ErrorKind


def duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `12ms`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class Bucket:
    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is there (0 when it is)."""
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


class Charge:
    """What one create took; `settle` gives back what it did not use."""

    __slots__ = ("_bucket", "_limits", "taken")

    def __init__(self, limits: "RateLimits", bucket: Bucket | None, taken: int):
        self._limits, self._bucket, self.taken = limits, bucket, taken

    def settle(self, used_tokens: int) -> None:
        if self._bucket is not None and self.taken > used_tokens:
            self._bucket.refill(self._limits.clock())
            self._bucket.level = min(self._bucket.capacity, self._bucket.level + self.taken - used_tokens)
        self._bucket = None  # once


class RateLimits:
    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0, clock=time.monotonic):
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)

    def _buckets(self, project: str) -> tuple[Bucket | None, Bucket | None]:
        now = self.clock()
        requests = tokens = None
        if self.requests_per_minute:
            requests = self._requests.get(project) or self._requests.setdefault(
                project, Bucket(self.requests_per_minute, now))
            requests.refill(now)
        if self.tokens_per_minute:
            tokens = self._tokens.get(project) or self._tokens.setdefault(project, Bucket(self.tokens_per_minute, now))
            tokens.refill(now)
        return requests, tokens

    def take(self, project: str, tokens_needed: int) -> Charge:
        """One request and `tokens_needed` tokens of `project`'s minute, or 429."""
        requests, tokens = self._buckets(project)
        if requests is not None and requests.level < 1:
            raise self._refused("requests", "RPM", project, requests, 1)
        if tokens is not None and tokens.level < tokens_needed:
            if tokens_needed > tokens.capacity:
                raise ApiError(ErrorKind.RATE_LIMITED,
                               f"Request too large for tokens per min (TPM) in project {project}: Limit "
                               f"{int(tokens.capacity)}, Requested {tokens_needed}. Lower max_output_tokens or the "
                               "input.", None, "rate_limit_exceeded")
            raise self._refused("tokens", "TPM", project, tokens, tokens_needed)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= tokens_needed
        return Charge(self, tokens, tokens_needed)

    @staticmethod
    def _refused(what: str, short: str, project: str, bucket: Bucket, requested: int) -> ApiError:
        used = int(bucket.capacity - bucket.level)
        wait = bucket.wait_for(requested)
        return ApiError(ErrorKind.RATE_LIMITED,
                        f"Rate limit reached for {what} per min ({short}) in project {project}: Limit "
                        f"{int(bucket.capacity)}, Used {used}, Requested {requested}. Please try again in "
                        f"{duration(wait)}.", None, "rate_limit_exceeded", retry_after_seconds=wait)

    def headers(self, project: str) -> tuple[tuple[str, str], ...]:
        """The `x-ratelimit-*` headers for a reply to `project` (none when limits are off)."""
        requests, tokens = self._buckets(project)
        headers = []
        for kind, bucket in (("requests", requests), ("tokens", tokens)):
            if bucket is not None:
                headers += [(f"x-ratelimit-limit-{kind}", str(int(bucket.capacity))),
                            (f"x-ratelimit-remaining-{kind}", str(int(bucket.level))),
                            (f"x-ratelimit-reset-{kind}", duration(bucket.until_full()))]
        return tuple(headers)
