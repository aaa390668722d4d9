"""Per-project rate limits: token buckets, OpenAI's 429 and headers."""

import pytest
from parley.errors import ApiError
from parley.service.limits import RateLimits, duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_durations_read_as_openai_writes_them():
    assert [duration(s) for s in (0, 0.012, 1, 59.2, 60, 360, 361)] == ["0ms", "12ms", "1s", "1m0s", "1m0s",
                                                                         "6m0s", "6m1s"]


def test_requests_per_minute_refuse_the_one_too_many_and_refill_over_time():
    clock = Clock()
    limits = RateLimits(requests_per_minute=2, clock=clock)
    limits.take("a", 0)
    limits.take("a", 0)
    with pytest.raises(ApiError) as refused:
        limits.take("a", 0)
    assert refused.value.kind.http_status == 429 and refused.value.code == "rate_limit_exceeded"
    assert "requests per min (RPM) in project a: Limit 2, Used 2, Requested 1" in refused.value.message
    limits.take("b", 0)  # another project has its own minute
    clock.now += 30  # half a minute refills one request
    limits.take("a", 0)


def test_tokens_are_charged_up_front_and_what_was_not_used_comes_back():
    clock = Clock()
    limits = RateLimits(tokens_per_minute=1000, clock=clock)
    charge = limits.take("a", 800)
    with pytest.raises(ApiError):
        limits.take("a", 300)
    charge.settle(100)  # used 100 of the 800 it was charged
    charge.settle(0)  # once only
    limits.take("a", 300)
    assert dict(limits.headers("a"))["x-ratelimit-remaining-tokens"] == "600"


def test_a_request_larger_than_the_whole_minute_says_so():
    limits = RateLimits(tokens_per_minute=100)
    with pytest.raises(ApiError) as refused:
        limits.take("a", 101)
    assert "Request too large for tokens per min (TPM)" in refused.value.message


def test_headers_say_limit_remaining_and_reset_and_none_when_off():
    clock = Clock()
    limits = RateLimits(requests_per_minute=60, tokens_per_minute=6000, clock=clock)
    limits.take("a", 600)
    headers = dict(limits.headers("a"))
    assert headers == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                       "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "6000",
                       "x-ratelimit-remaining-tokens": "5400", "x-ratelimit-reset-tokens": "6s"}
    assert RateLimits().headers("a") == () and not RateLimits().enabled
