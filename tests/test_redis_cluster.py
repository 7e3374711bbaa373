"""RedisRateLimiter and RedisConversationStore on a real three-node Redis Cluster.

Skipped with the reason when redis-server or redis-cli is missing; failed instead when
``AUTOCALLS_REQUIRE_REDIS`` is set (CI).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster as ClusterClient

from autocalls_async import AsyncAutocalls, Conversation, RateLimit, RateLimitTimeout
from autocalls_async._redis import RedisConversationStore, RedisRateLimiter, check_eviction
from autocalls_async.testing import MockAutocalls

from .redis_server import RedisCluster, require_redis_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    server, cli = require_redis_cluster()
    started = RedisCluster(server, cli).start()
    yield started
    started.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


def assert_rolling(starts: list[float], rate: RateLimit) -> None:
    starts = sorted(starts)
    for first, last in zip(starts, starts[rate.requests :], strict=False):
        assert last - first >= rate.period - 0.002, (first, last, starts)


@pytest.mark.timing
async def test_limiters_share_a_schedule_through_a_cluster_url(
    cluster: RedisCluster, prefix: str
) -> None:
    """Two limiters on a ``redis+cluster://`` URL keep one schedule per token; tokens whose
    keys live on every node of the cluster are served (one key, one slot, per script)."""
    rate = RateLimit(5, 0.5)
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    async with (
        RedisRateLimiter(cluster.url, rate_limit=rate, prefix=prefix) as one,
        RedisRateLimiter(cluster.url, rate_limit=rate, prefix=prefix) as two,
    ):
        assert "redis+cluster://" in repr(one)

        async def take(limiter: RedisRateLimiter, key: str) -> None:
            async with limiter.slot(key) as slot:
                if key == "tok":
                    starts.append(loop.time())
                slot.sent()

        await asyncio.gather(*(take(one if i % 2 else two, "tok") for i in range(10)))
        keys = [f"k{i}" for i in range(30)]
        await asyncio.gather(*(take(one, key) for key in keys))
        store = one.redis_store.redis
        assert isinstance(store, ClusterClient)
        nodes = {
            store.get_node_from_key(one.redis_key(key)).name  # type: ignore[union-attr]
            for key in keys
        }
    assert len(nodes) == 3  # the tokens' keys are spread over every node
    assert len(starts) == 10
    assert_rolling(starts, rate)


@pytest.mark.timing
async def test_client_on_a_cluster_keeps_a_strict_server_happy(
    cluster: RedisCluster, prefix: str
) -> None:
    """The client on a caller's own RedisCluster (borrowed, never closed): no 429 from the
    emulator's strict window; 300 waiting calls with max_wait answered or RateLimitTimeout."""
    client_cluster = ClusterClient.from_url(cluster.url.replace("redis+cluster", "redis"))
    rate = RateLimit(10, 0.5)
    try:
        async with (
            MockAutocalls(rate_limit=(10, 0.5)) as server,
            RedisRateLimiter(client_cluster, rate_limit=rate, prefix=prefix) as limiter,
            RedisConversationStore(client_cluster, prefix=prefix) as conversations,
            AsyncAutocalls(
                "tok-cluster",
                base_url=server.base_url,
                limiter=limiter,
                conversation_store=conversations,
                # 2 s: about 40 answered at 20 per second, 10 at least on a loaded machine,
                # where queueing the 300 calls takes a while (with 1 s, 4 were seen).
                max_wait=2.0,
            ) as client,
        ):
            results = await asyncio.gather(
                *(
                    client.generate_reply(
                        assistant_id=123, customer_identifier=f"c{i}", message="Hi"
                    )
                    for i in range(300)
                ),
                return_exceptions=True,
            )
            answered = [r for r in results if not isinstance(r, BaseException)]
            failed = [r for r in results if isinstance(r, BaseException)]
            assert all(isinstance(r, RateLimitTimeout) for r in failed), failed[:3]
            assert len(answered) >= 10
            assert server.count(status=429) == 0
            assert_rolling([r.time for r in server.requests], RateLimit(10, 0.5, margin=0))
            seen = await conversations.get(123, "c0")
            first = next(r for r in results if not isinstance(r, BaseException))
            assert seen is None or seen.conversation_id
            assert await conversations.get(123, first.customer_identifier) is not None
        assert await client_cluster.ping()  # still open: ours, not theirs, to close
    finally:
        await client_cluster.aclose()


async def test_conversation_store_on_a_cluster_url(cluster: RedisCluster, prefix: str) -> None:
    """Conversations on a cluster: one worker writes, another reads, on any node."""
    async with (
        RedisConversationStore(cluster.url, prefix=prefix) as writer,
        RedisConversationStore(cluster.url, prefix=prefix) as reader,
    ):
        assert "redis+cluster://" in repr(reader)
        conversations = [
            Conversation(123, f"+1415555{i:04d}", f"id{i}", False, 1.0) for i in range(20)
        ]
        for conversation in conversations:
            await writer.set(conversation)
        for conversation in conversations:
            assert await reader.get(123, conversation.customer_identifier) == conversation


async def test_eviction_policy_is_read_from_every_node(cluster: RedisCluster) -> None:
    """INFO on a cluster answers per node: each is checked; one that may evict is named."""
    client = ClusterClient.from_url(cluster.url.replace("redis+cluster", "redis"))
    try:
        assert await check_eviction(client, "cluster") is None
        node = client.get_nodes()[1]
        await client.config_set("maxmemory", "64mb", target_nodes=node)
        await client.config_set("maxmemory-policy", "volatile-lru", target_nodes=node)
        try:
            warning = await check_eviction(client, "cluster")
            assert warning is not None and "volatile-lru" in warning
        finally:
            await client.config_set("maxmemory", "0", target_nodes=node)
            await client.config_set("maxmemory-policy", "noeviction", target_nodes=node)
    finally:
        await client.aclose()
