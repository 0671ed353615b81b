"""Reading and writing the wire format: unknown fields are ignored, and the
request carries the ``schema_version`` REQUEST_SCHEMA_VERSION says (none when it is None)."""

from __future__ import annotations

import pytest

import holdfast_client.requests as requests_module
from holdfast_client import (
    Batch,
    Completed,
    Granted,
    Insufficient,
    Item,
    Option,
    ProtocolError,
    parse_event,
)

INSUFFICIENT = {
    "schema_version": 1,
    "event": "decision",
    "decision": "insufficient",
    "batch_id": "spring-2026-0001",
    "account_id": "acme",
    "mode": "all_or_nothing",
    "total_cost": 120,
    "available": 100,
    "shortfall": 20,
    "items_total": 10,
    "fit_count": 8,
    "first_fit": {"count": 8, "cost": 96, "item_ids": ["a"], "later": True},
    "priority_fit": {"count": 8, "cost": 96, "item_ids": ["a"]},
    "message": "You have enough credits to generate 8 out of 10 items.",
    "detail": "This action costs 120 credits. You have 100 credits available (20 short).",
    "options": [
        {"action": "generate_first_fit", "label": "Generate the first 8", "item_count": 8, "credits": 96},
        {"action": "select_items", "label": "Select items manually"},
        {"action": "book_a_call", "label": "Talk to sales", "url": "https://example.invalid"},
    ],
    "limited_by": {"level": "account", "remaining": 100, "colour": "red"},
    "a_field_from_the_future": {"nested": [1, 2, 3]},
}


def test_unknown_fields_and_options_are_tolerated() -> None:
    decision = parse_event(INSUFFICIENT)
    assert isinstance(decision, Insufficient)
    assert decision.fit_count == 8
    assert decision.raw["schema_version"] == 1, "kept in raw"
    assert decision.generate_first_fit is not None
    assert decision.add_credits is None
    unknown = decision.options[2]
    assert type(unknown) is Option and unknown.action == "book_a_call"
    assert decision.limited_by is not None and decision.limited_by.remaining == 100


def test_completed_and_granted_with_extra_fields() -> None:
    done = parse_event(
        {"event": "completed", "schema_version": 1, "batch_id": "b", "account_id": "a",
         "state": "completed", "items_total": 2, "run": 2, "succeeded": 2, "failed": 0,
         "skipped": 0, "pending": 0, "reserved": 20, "captured": 20, "released": 0,
         "overrun": 0, "duration_ms": 5}
    )
    assert isinstance(done, Completed) and done.figures.cancelled == 0
    granted = parse_event(
        {"event": "decision", "decision": "granted", "schema_version": 1, "batch_id": "b",
         "account_id": "a", "mode": "first_fit", "hold_id": "h", "reserved": 10,
         "items_total": 2, "item_ids": ["x"], "left_out": [{"item_id": "y", "reason": "did_not_fit"}],
         "deadline_at": "2026-11-25T07:02:46.612Z"}
    )
    assert isinstance(granted, Granted) and granted.left_out[0].item_id == "y"


def test_a_missing_field_is_named() -> None:
    broken = {k: v for k, v in INSUFFICIENT.items() if k != "fit_count"}
    with pytest.raises(ProtocolError, match="`fit_count`"):
        parse_event(broken)
    with pytest.raises(ProtocolError, match="unknown event `gossip`"):
        parse_event({"event": "gossip"})


def test_requests_carry_the_schema_version(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = Batch("acme", [Item("a", 5, priority=2, payload={"p": 1})], batch_id="b-1")
    assert batch.to_json()["schema_version"] == 1
    monkeypatch.setattr(requests_module, "REQUEST_SCHEMA_VERSION", None)
    assert batch.to_json() == {
        "batch_id": "b-1",
        "account_id": "acme",
        "mode": "all_or_nothing",
        "items": [{"item_id": "a", "estimated_cost": 5, "priority": 2, "payload": {"p": 1}}],
    }
