"""What the client says when RabbitMQ cannot deliver, or nobody answers."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import aio_pika
import pytest
from conftest import Fleet

from holdfast_client import AnswerTimeout, Batch, Client, Granted, Item, PublishError


async def test_a_missing_intake_exchange_raises(
    client: Client, new_account: Callable[[int], str]
) -> None:
    fleet_namespace = client.namespace
    client.namespace = f"py-nowhere-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(PublishError) as raised:
            await client.submit(Batch("acme", [Item("a", 1)]))
    finally:
        client.namespace = fleet_namespace
    assert raised.value.exchange.startswith("py-nowhere-")
    assert "does not exist" in str(raised.value)

    # RabbitMQ closed the publishing channel; the same client goes on working.
    decision = await client.submit(Batch(new_account(10), [Item("a", 1)]))
    assert isinstance(decision, Granted)


async def test_an_unroutable_request_raises(fleet: Fleet) -> None:
    """``mandatory``: an intake exchange bound to no queue returns the message."""
    namespace = f"py-unbound-{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(fleet.amqp_url)
    try:
        channel = await conn.channel()
        intake = await channel.declare_exchange(
            f"{namespace}.intake", aio_pika.ExchangeType.DIRECT, auto_delete=True
        )
        async with Client(fleet.amqp_url, namespace=namespace, timeout=5) as c:
            with pytest.raises(PublishError) as raised:
                await c.submit(Batch("acme", [Item("a", 1)]))
        assert "NO_ROUTE" in str(raised.value)
        await intake.delete()
    finally:
        await conn.close()


async def test_no_coordinator_answering_times_out(fleet: Fleet) -> None:
    """A request that reaches a queue nobody consumes: a clear timeout."""
    namespace = f"py-idle-{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(fleet.amqp_url)
    try:
        channel = await conn.channel()
        intake = await channel.declare_exchange(
            f"{namespace}.intake", aio_pika.ExchangeType.DIRECT, auto_delete=True
        )
        queue = await channel.declare_queue(f"{namespace}.requests", exclusive=True)
        await queue.bind(intake, routing_key="requests")
        batch = Batch("acme", [Item("a", 1)])
        async with Client(fleet.amqp_url, namespace=namespace) as c:
            with pytest.raises(AnswerTimeout) as raised:
                await c.submit(batch, timeout=1.5)
        assert raised.value.batch_id == batch.batch_id
        assert raised.value.timeout == 1.5
        assert "is a Holdfast coordinator running" in str(raised.value)
        assert isinstance(raised.value, TimeoutError)
        # The request itself did reach the queue.
        waiting = await queue.get(timeout=5)
        assert waiting.reply_to and waiting.correlation_id
        assert waiting.user_id == "guest"
        await intake.delete()
    finally:
        await conn.close()
