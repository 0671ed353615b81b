"""Submitting batches: granted, insufficient and its options, rejected, idempotent."""

from __future__ import annotations

from collections.abc import Callable

from conftest import Fleet

from holdfast_client import (
    AddCredits,
    Batch,
    Client,
    GenerateFirstFit,
    Granted,
    Insufficient,
    Item,
    Mode,
    Rejected,
    SelectItems,
)


def photos(n: int, cost: int = 12) -> list[Item]:
    return [Item(f"photo-{i:02d}", cost, payload={"prompt": f"photo {i}"}) for i in range(1, n + 1)]


async def test_granted_batch_runs_every_item(
    client: Client, fleet: Fleet, new_account: Callable[[int], str]
) -> None:
    account = new_account(1000)
    batch = Batch(account, photos(5, cost=10))

    decision = await client.submit(batch, wait=True)

    assert isinstance(decision, Granted), decision
    assert decision.batch_id == batch.batch_id
    assert decision.reserved == 50
    assert decision.item_ids == tuple(i.item_id for i in batch.items)
    assert decision.left_out == ()
    assert decision.completed is not None
    assert decision.completed.state == "completed"
    assert decision.completed.figures.succeeded == 5
    assert decision.completed.figures.captured == 50
    info = await client.batch(batch.batch_id)
    assert info.state == "completed" and info.closed
    assert [i.state for i in info.items] == ["succeeded"] * 5
    assert fleet.account(account)["balance"] == 950


async def test_submit_without_wait_returns_the_decision_at_once(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(100)
    slow = {"simulate": {"latency_ms": 1500}}
    batch = Batch(account, [Item("slow", 10, payload=slow)])

    decision = await client.submit(batch)

    assert isinstance(decision, Granted)
    assert decision.completed is None
    info = await client.batch(batch.batch_id)
    assert not info.closed, "the decision came before the item ran"


async def test_insufficient_then_first_fit_runs_exactly_k(
    client: Client, fleet: Fleet, new_account: Callable[[int], str]
) -> None:
    account = new_account(100)
    batch = Batch(account, photos(10))

    decision = await client.submit(batch)

    assert isinstance(decision, Insufficient), decision
    assert decision.message == "You have enough credits to generate 8 out of 10 items."
    assert (decision.total_cost, decision.available, decision.shortfall) == (120, 100, 20)
    assert decision.fit_count == 8
    assert decision.first_fit.item_ids == tuple(f"photo-{i:02d}" for i in range(1, 9))
    assert [type(o) for o in decision.options] == [GenerateFirstFit, SelectItems, AddCredits]
    take = decision.generate_first_fit
    assert take is not None
    assert (take.item_count, take.credits, take.label) == (8, 96, "Generate the first 8")
    assert decision.add_credits is not None and decision.add_credits.credits == 20
    assert fleet.account(account)["held"] == 0, "an insufficient batch holds nothing"

    retry = take.request(batch)
    assert retry.batch_id != batch.batch_id and retry.mode == Mode.FIRST_FIT
    granted = await client.submit(retry, wait=True)

    assert isinstance(granted, Granted), granted
    assert granted.item_ids == decision.first_fit.item_ids
    assert [(o.item_id, o.reason) for o in granted.left_out] == [
        ("photo-09", "did_not_fit"),
        ("photo-10", "did_not_fit"),
    ]
    assert granted.completed is not None
    assert granted.completed.figures.succeeded == 8
    assert granted.completed.figures.skipped == 2
    info = await client.batch(retry.batch_id)
    ran = [i.item_id for i in info.items if i.state == "succeeded"]
    assert ran == list(decision.first_fit.item_ids), "exactly the first 8 ran"
    assert [i.state for i in info.items if i.item_id not in ran] == ["skipped", "skipped"]
    assert fleet.account(account)["balance"] == 4
    # The denied batch stays denied, and was never charged.
    assert (await client.batch(batch.batch_id)).state == "denied"


async def test_select_items_option_runs_the_chosen_items(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(30)
    batch = Batch(account, photos(4))
    decision = await client.submit(batch)
    assert isinstance(decision, Insufficient)
    assert decision.select_items is not None

    chosen = decision.select_items.request(batch, ["photo-02", "photo-04"])
    granted = await client.submit(chosen, wait=True)

    assert isinstance(granted, Granted), granted
    assert granted.item_ids == ("photo-02", "photo-04")
    assert {o.reason for o in granted.left_out} == {"not_selected"}
    assert granted.completed is not None and granted.completed.figures.captured == 24


async def test_nothing_fits_offers_no_first_fit(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(5)
    decision = await client.submit(Batch(account, photos(3)))
    assert isinstance(decision, Insufficient)
    assert decision.fit_count == 0
    assert decision.generate_first_fit is None
    assert decision.message == "You don't have enough credits to generate any of the 3 items."


async def test_rejected_bad_input_names_the_field(
    client: Client, new_account: Callable[[int], str]
) -> None:
    account = new_account(100)
    batch = Batch(account, [Item("a", 5), Item("b", -5), Item("a", 5)])

    decision = await client.submit(batch)

    assert isinstance(decision, Rejected), decision
    assert decision.batch_id == batch.batch_id
    assert decision.fields == ("items[1].estimated_cost", "items[2].item_id")
    reason = decision.error_for("items[1].estimated_cost")
    assert reason is not None and "greater than zero" in reason
    assert "items[2].item_id: duplicate item id `a`" in decision.reason


async def test_rejected_unknown_account_and_unreadable_body(client: Client) -> None:
    unknown = await client.submit(Batch("py-no-such-account", [Item("a", 1)]))
    assert isinstance(unknown, Rejected)
    assert unknown.fields == ("account_id",)

    garbage = await client.submit(b"this is not JSON")
    assert isinstance(garbage, Rejected)
    assert garbage.batch_id is None
    assert garbage.fields == ("body",)


async def test_resubmit_replays_the_decision_and_charges_once(
    client: Client, fleet: Fleet, new_account: Callable[[int], str]
) -> None:
    account = new_account(100)
    batch = Batch(account, photos(3, cost=10))

    first = await client.submit(batch, wait=True)
    # The replayed decision gets no summary on the reply queue: waiting for it
    # goes through the HTTP API.
    again = await client.submit(batch, wait=True)

    assert isinstance(first, Granted) and isinstance(again, Granted)
    assert again.hold_id == first.hold_id
    assert again.deadline_at == first.deadline_at
    assert again.raw == first.raw
    assert again.completed is not None and first.completed is not None
    assert again.completed.figures == first.completed.figures
    assert fleet.account(account)["balance"] == 70, "charged once"

    # A dict with the same content, in another key order, is the same request.
    as_dict = dict(reversed(list(batch.to_json().items())))
    replayed = await client.submit(as_dict)
    assert isinstance(replayed, Granted) and replayed.raw == first.raw

    changed = Batch(account, photos(4, cost=10), batch_id=batch.batch_id)
    conflict = await client.submit(changed)
    assert isinstance(conflict, Rejected)
    assert conflict.fields == ("batch_id",)
    assert fleet.account(account)["balance"] == 70


async def test_a_denied_batch_stays_denied(
    client: Client, fleet: Fleet, new_account: Callable[[int], str]
) -> None:
    account = new_account(10)
    batch = Batch(account, photos(2, cost=10))
    denied = await client.submit(batch)
    assert isinstance(denied, Insufficient)
    assert denied.add_credits is not None
    fleet.cli("account", "grant", account, str(denied.add_credits.credits))

    assert await client.submit(batch) == denied, "the same batch_id replays the denial"
    retry = await client.submit(denied.add_credits.request(batch), wait=True)
    assert isinstance(retry, Granted), retry
    assert retry.completed is not None and retry.completed.figures.succeeded == 2
