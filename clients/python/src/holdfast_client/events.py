"""What Holdfast says about a batch after its decision: progress and completion.

Every message Holdfast sends has an ``event`` field (``decision``,
``progress``, ``completed``, ``preview``); :func:`parse_event` reads any of
them. Fields this version does not know are ignored (and kept in ``raw``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

from . import _json as j
from .decisions import Decision, parse_decision
from .errors import ProtocolError
from .previews import Preview

#: States of a batch that closed: it holds nothing any more.
CLOSED_STATES = frozenset({"completed", "expired", "cancelled"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchFigures:
    """Counts and credits of a batch (docs/messages.md, "Batch events")."""

    items_total: int
    #: Items reserved to run so far.
    run: int
    succeeded: int
    failed: int
    cancelled: int
    #: Items never held (left out by the mode, or not reached).
    skipped: int
    #: Reserved and not settled yet.
    pending: int
    reserved: int
    captured: int
    released: int
    #: Actual cost reported above the reservations: recorded, not charged.
    overrun: int

    @classmethod
    def from_json(cls, d: j.JsonObject) -> BatchFigures:
        return cls(
            items_total=j.integer(d, "items_total"),
            run=j.integer(d, "run"),
            succeeded=j.integer(d, "succeeded"),
            failed=j.integer(d, "failed"),
            cancelled=j.integer(d, "cancelled", default=0),
            skipped=j.integer(d, "skipped"),
            pending=j.integer(d, "pending"),
            reserved=j.integer(d, "reserved"),
            captured=j.integer(d, "captured"),
            released=j.integer(d, "released"),
            overrun=j.integer(d, "overrun"),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Progress:
    """A batch is running: a hint for a progress bar (may come late, or not at all)."""

    batch_id: str
    account_id: str
    figures: BatchFigures
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Completed:
    """A batch closed and its hold was resolved: ``reserved = captured + released``."""

    batch_id: str
    account_id: str
    #: ``completed``, ``expired`` or ``cancelled``.
    state: str
    figures: BatchFigures
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)


#: Anything :meth:`Client.events` yields.
BatchEvent = Union[Decision, Progress, Completed]


def parse_event(d: j.JsonObject) -> Decision | Progress | Completed | Preview:
    """Read one message from Holdfast by its ``event`` field."""
    event = j.string(d, "event")
    if event == "decision":
        return parse_decision(d)
    if event == "progress":
        return Progress(
            raw=d,
            batch_id=j.string(d, "batch_id"),
            account_id=j.string(d, "account_id"),
            figures=BatchFigures.from_json(d),
        )
    if event == "completed":
        return Completed(
            raw=d,
            batch_id=j.string(d, "batch_id"),
            account_id=j.string(d, "account_id"),
            state=j.string(d, "state"),
            figures=BatchFigures.from_json(d),
        )
    if event == "preview":
        return Preview.from_json(d)
    raise ProtocolError(f"unknown event `{event}`")
