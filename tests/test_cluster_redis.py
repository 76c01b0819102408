"""dicomproxy.cluster.redis: errors name where Redis is and what to check, never the password."""

from __future__ import annotations

from dicomproxy.cluster.redis import unavailable, where


def test_where_and_errors_never_show_the_password() -> None:
    assert where("redis://:s3cret@redis.example.org:6380/2") == "redis.example.org:6380"
    assert where("rediss://user:s3cret@redis.example.org/0") == "redis.example.org:6379"
    assert where("unix:///run/redis.sock") == "/run/redis.sock"
    message = str(unavailable("redis://:s3cret@10.0.0.5:6379/0", ConnectionRefusedError("refused")))
    assert "s3cret" not in message
    assert "10.0.0.5:6379" in message and "Cluster:Redis" in message and "redis-server" in message
