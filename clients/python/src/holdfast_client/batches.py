"""A batch as the HTTP API shows it (``GET /v1/batches/{id}``): its state,
hold, figures, decision, and every item with its state."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from . import _json as j
from .decisions import Decision, parse_decision
from .events import CLOSED_STATES, BatchFigures, Completed


@dataclasses.dataclass(frozen=True, kw_only=True)
class ItemInfo:
    """One item of a batch."""

    item_id: str
    #: ``queued``, ``pending``, ``succeeded``, ``failed``, ``cancelled`` or ``skipped``.
    state: str
    estimated_cost: int
    reserved: int
    captured: int
    overrun: int
    #: Why it was skipped or failed, when it was.
    reason: str | None = None

    @classmethod
    def from_json(cls, d: j.JsonObject) -> ItemInfo:
        return cls(
            item_id=j.string(d, "item_id"),
            state=j.string(d, "state"),
            estimated_cost=j.integer(d, "estimated_cost"),
            reserved=j.integer(d, "reserved"),
            captured=j.integer(d, "captured"),
            overrun=j.integer(d, "overrun"),
            reason=j.opt_string(d, "reason"),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchInfo:
    """A batch that was decided (granted or denied) and recorded."""

    batch_id: str
    account_id: str
    mode: str
    #: ``denied``, ``granted``, ``dispatched``, ``cancelling``, ``completed``, ``expired`` or ``cancelled``.
    state: str
    hold_id: str | None
    hold_state: str | None
    created_at: str
    deadline_at: str | None
    closed_at: str | None
    figures: BatchFigures
    #: The decision as it was sent.
    decision: Decision
    items: tuple[ItemInfo, ...]
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def closed(self) -> bool:
        """True once the batch holds nothing and will change no more (denied, or closed)."""
        return self.state == "denied" or self.state in CLOSED_STATES

    def item(self, item_id: str) -> ItemInfo:
        """The item ``item_id`` (``KeyError`` if the batch has no such item)."""
        for i in self.items:
            if i.item_id == item_id:
                return i
        raise KeyError(item_id)

    def as_completed(self) -> Completed | None:
        """The batch's ``completed`` event, as the workers would announce it, once it closed."""
        if self.state not in CLOSED_STATES:
            return None
        return Completed(
            raw={"event": "completed", "batch_id": self.batch_id, "account_id": self.account_id,
                 "state": self.state, **dataclasses.asdict(self.figures)},
            batch_id=self.batch_id,
            account_id=self.account_id,
            state=self.state,
            figures=self.figures,
        )

    @classmethod
    def from_json(cls, d: j.JsonObject) -> BatchInfo:
        return cls(
            raw=d,
            batch_id=j.string(d, "batch_id"),
            account_id=j.string(d, "account_id"),
            mode=j.string(d, "mode"),
            state=j.string(d, "state"),
            hold_id=j.opt_string(d, "hold_id"),
            hold_state=j.opt_string(d, "hold_state"),
            created_at=j.string(d, "created_at"),
            deadline_at=j.opt_string(d, "deadline_at"),
            closed_at=j.opt_string(d, "closed_at"),
            figures=BatchFigures.from_json(j.obj(d, "figures")),
            decision=parse_decision(j.obj(d, "decision")),
            items=tuple(ItemInfo.from_json(x) for x in j.objects(d, "items")),
        )
