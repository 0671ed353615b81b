"""A producer broker user may publish to the intake and use its own reply
queues, nothing else (docs/security.md, "Broker users"): the client works
with that, and follows batches over HTTP instead of the events exchange."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import Fleet

from holdfast_client import Batch, Client, Completed, Granted, Item, Progress


@pytest.fixture
async def producer(fleet: Fleet) -> AsyncIterator[Client]:
    url = os.environ.get("HOLDFAST_TEST_PRODUCER_AMQP_URL")
    if not url:
        pytest.skip("no producer broker user (the script makes one in a virtual host of its own)")
    async with Client(
        url, fleet.http_url, key=fleet.key, namespace=fleet.namespace, poll_interval=0.3
    ) as c:
        yield c


async def test_a_producer_user_submits_and_waits(
    producer: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(100)
    preview = await producer.preview(Batch(account, [Item("a", 10)]))
    assert preview.fits

    decision = await producer.submit(Batch(account, [Item("a", 10), Item("b", 10)]), wait=True)

    assert isinstance(decision, Granted), decision
    assert decision.completed is not None and decision.completed.figures.captured == 20


async def test_a_producer_user_follows_a_batch_over_http(
    producer: Client, new_account: Callable[[int], str], caplog: pytest.LogCaptureFixture
) -> None:
    account = new_account(1000)
    items = [Item(f"step-{i}", 10, payload={"simulate": {"latency_ms": 500 * i}}) for i in range(1, 5)]
    batch = Batch(account, items)
    decision = await producer.submit(batch)
    assert isinstance(decision, Granted)

    with caplog.at_level(logging.DEBUG, logger="holdfast_client"):
        events = await asyncio.wait_for(
            _collect(producer, batch.batch_id), timeout=30
        )

    assert "following over HTTP" in caplog.text, "the events exchange is not readable"
    assert isinstance(events[0], Granted)
    assert isinstance(events[-1], Completed)
    assert events[-1].figures.succeeded == 4
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress, "figures that changed while the batch ran are reported"
    assert all(p.figures.pending > 0 for p in progress)


async def _collect(client: Client, batch_id: str) -> list[object]:
    return [e async for e in client.events(batch_id)]
