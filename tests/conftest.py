"""Fixtures shared by every test module: a fresh redis-server per test (``redis_srv``)."""

from redis_server import redis_srv  # noqa: F401  (registers the fixture for this directory)
