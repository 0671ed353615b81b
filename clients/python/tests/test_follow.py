"""Previews, reading a batch, and following it with events()."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import pytest
from conftest import Fleet

from holdfast_client import (
    ApiError,
    Batch,
    BatchEvent,
    Client,
    Completed,
    Granted,
    Insufficient,
    Item,
    NotConfigured,
    NotFound,
    Progress,
    RequestRejected,
)


async def test_preview_says_what_fits_and_holds_nothing(
    client: Client, fleet: Fleet, new_account: Callable[[int], str]
) -> None:
    account = new_account(95)
    batch = Batch(account, [Item(f"item-{i}", 12) for i in range(1, 11)])

    preview = await client.preview(batch)

    assert not preview.fits
    assert (preview.total_cost, preview.available, preview.shortfall) == (120, 95, 25)
    assert preview.fit_count == 7
    assert preview.first_fit.item_ids == tuple(f"item-{i}" for i in range(1, 8))
    assert preview.advice == "You have enough credits to generate 7 out of 10 items."
    assert preview.message == "This action will cost ~120 credits. You have 95 credits."
    assert fleet.account(account)["held"] == 0

    shorthand = await client.preview({"account_id": account, "count": 5, "cost": 12})
    assert shorthand.fits and shorthand.fit_count == 5 and shorthand.total_cost == 60


async def test_preview_of_an_unknown_account_is_rejected(client: Client) -> None:
    with pytest.raises(RequestRejected) as raised:
        await client.preview({"account_id": "py-nobody", "count": 1, "cost": 1})
    assert raised.value.rejected.fields == ("account_id",)
    assert "unknown account" in str(raised.value)


async def collect(client: Client, batch_id: str) -> list[BatchEvent]:
    return [event async for event in client.events(batch_id, timeout=30)]


async def test_events_follow_a_batch_to_completion(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(1000)
    # Items that settle one after another over about two seconds, one failing.
    items = [
        Item(f"step-{i}", 10, payload={"simulate": {"latency_ms": 400 * i}}) for i in range(1, 5)
    ] + [Item("broken", 10, payload={"simulate": {"fail": True, "latency_ms": 200}})]
    batch = Batch(account, items)
    following = asyncio.create_task(collect(client, batch.batch_id))
    await asyncio.sleep(0.3)  # start following first (it also catches up if late)

    decision = await client.submit(batch)
    events = await following

    assert isinstance(decision, Granted)
    assert isinstance(events[0], Granted) and events[0].hold_id == decision.hold_id
    done = events[-1]
    assert isinstance(done, Completed), events
    assert done.state == "completed"
    f = done.figures
    assert (f.succeeded, f.failed, f.pending) == (4, 1, 0)
    assert (f.reserved, f.captured, f.released) == (50, 40, 10)
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress, "a batch of two seconds reports progress"
    assert all(p.figures.pending > 0 for p in progress)
    assert len(events) == 2 + len(progress)


async def test_events_of_a_finished_batch_end_at_once(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(100)
    batch = Batch(account, [Item("a", 10)])
    first = await client.submit(batch, wait=True)
    assert isinstance(first, Granted)

    events = await asyncio.wait_for(collect(client, batch.batch_id), 10)

    assert [type(e) for e in events] == [Granted, Completed]


async def test_events_of_a_denied_batch_end_with_the_decision(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(1)
    batch = Batch(account, [Item("a", 10)])
    assert isinstance(await client.submit(batch), Insufficient)

    events = await asyncio.wait_for(collect(client, batch.batch_id), 10)

    assert [type(e) for e in events] == [Insufficient]


async def test_batch_of_an_unknown_id_is_not_found(client: Client) -> None:
    with pytest.raises(NotFound) as raised:
        await client.batch("py-never-submitted")
    assert raised.value.status == 404


async def test_the_http_api_needs_a_valid_key(fleet: Fleet) -> None:
    async with Client(fleet.amqp_url, fleet.http_url, key="hf_live_not-a-key", namespace=fleet.namespace) as c:
        with pytest.raises(ApiError) as raised:
            await c.batch("anything")
    assert raised.value.status == 401
    async with Client(fleet.amqp_url, namespace=fleet.namespace) as c:
        with pytest.raises(NotConfigured):
            await c.batch("anything")


async def test_events_skip_what_they_cannot_read(
    client: Client, fleet: Fleet, new_account: Callable[[int], str]
) -> None:
    """Every batch's events reach the private queue: one this version cannot
    read (or another batch's) does not end the following of this one."""
    account = new_account(100)
    batch = Batch(account, [Item("a", 10, payload={"simulate": {"latency_ms": 800}})])
    following = asyncio.create_task(collect(client, batch.batch_id))
    await asyncio.sleep(0.3)
    conn = await aio_pika.connect(fleet.amqp_url)
    try:
        channel = await conn.channel()
        events = await channel.get_exchange(f"{fleet.namespace}.events", ensure=False)
        for body in [b"{not json", b'{"event": "gossip"}', b'{"event": "progress"}']:
            await events.publish(aio_pika.Message(body), routing_key="batch.progress")
    finally:
        await conn.close()

    assert isinstance(await client.submit(batch), Granted)
    got = await following

    assert [type(e) for e in got if not isinstance(e, Progress)] == [Granted, Completed]
