"""The Redis server that the production channel layer uses, for the tests that prove it."""

from __future__ import annotations

import os

import pytest
import redis


def redis_or_skip(url: str) -> redis.Redis:
    """A client of the Redis at `url` once it answers. Under CI=true a missing Redis fails
    the test: CI must prove the production layer, not skip it."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        client.close()
        reason = f"Redis does not answer at {url}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return client
