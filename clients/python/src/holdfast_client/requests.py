"""What a producer sends: a batch of items, and how much of it may run.

Nothing is validated here beyond the Python types: the coordinator is the one
authority on what is valid, and answers a bad request with a ``rejected``
decision that names each field (docs/messages.md, "Rejections").
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from enum import Enum
from typing import Any

#: The ``schema_version`` written into every request, or ``None`` to send none.
#:
#: Absent means version 1 to the coordinator, and a coordinator from before the
#: field ignores it (readers ignore fields they do not know), so sending it is
#: safe against every coordinator. Every request body is built by
#: :meth:`Batch.to_json`, which reads it.
REQUEST_SCHEMA_VERSION: int | None = 1


class Mode(str, Enum):
    """How much of a batch may run when the credits do not cover all of it."""

    #: Every item runs, or none does (the default).
    ALL_OR_NOTHING = "all_or_nothing"
    #: The longest prefix of the items, in request order, that fits.
    FIRST_FIT = "first_fit"
    #: The longest prefix by descending priority that fits.
    PRIORITY_FIT = "priority_fit"
    #: Exactly the items named in ``item_ids``, all or nothing.
    SELECTED = "selected"
    #: Reserve and run chunk by chunk, stopping cleanly when a chunk no longer fits.
    SEQUENTIAL = "sequential"


@dataclasses.dataclass(frozen=True)
class Item:
    """One item of a batch: what it is estimated to cost, and what the generator gets."""

    item_id: str
    #: Reserved for the item, and the most it can be charged (a positive integer).
    estimated_cost: int
    #: Higher runs first under ``priority_fit``.
    priority: int = 0
    #: Opaque to Holdfast, handed to the generator (any JSON value).
    payload: Any = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "estimated_cost": self.estimated_cost}
        if self.priority:
            out["priority"] = self.priority
        if self.payload is not None:
            out["payload"] = self.payload
        return out


def new_batch_id() -> str:
    """A fresh, unguessable batch id (batch ids are global idempotency keys)."""
    return str(uuid.uuid4())


@dataclasses.dataclass(frozen=True)
class Batch:
    """A "Generate All": one request for the whole batch.

    ``batch_id`` is the idempotency key: sending the same batch again gets the
    same decision back and is charged once. A new attempt (after an
    ``insufficient`` decision, say) needs a new ``batch_id``; the option
    objects of :class:`~holdfast_client.Insufficient` build one for you.
    """

    account_id: str
    items: Sequence[Item]
    mode: Mode = Mode.ALL_OR_NOTHING
    batch_id: str = dataclasses.field(default_factory=new_batch_id)
    #: With ``Mode.SELECTED`` only: the items to run.
    item_ids: Sequence[str] | None = None
    #: A soft hold to consume instead of reserving anew.
    reservation_id: str | None = None
    #: The spender (team, member, key) of the account the batch is charged to.
    spender_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request body (docs/messages.md, "The batch request")."""
        out: dict[str, Any] = {}
        if REQUEST_SCHEMA_VERSION is not None:
            out["schema_version"] = REQUEST_SCHEMA_VERSION
        out["batch_id"] = self.batch_id
        out["account_id"] = self.account_id
        out["mode"] = Mode(self.mode).value
        out["items"] = [item.to_json() for item in self.items]
        if self.item_ids is not None:
            out["item_ids"] = list(self.item_ids)
        if self.reservation_id is not None:
            out["reservation_id"] = self.reservation_id
        if self.spender_id is not None:
            out["spender_id"] = self.spender_id
        return out

    def again(
        self,
        *,
        mode: Mode | None = None,
        item_ids: Sequence[str] | None = None,
        batch_id: str | None = None,
    ) -> Batch:
        """The same items as a new attempt: a new ``batch_id`` (unless given), and
        optionally another mode and selection. A soft hold is not carried over."""
        new_mode = self.mode if mode is None else mode
        return dataclasses.replace(
            self,
            batch_id=batch_id or new_batch_id(),
            mode=new_mode,
            item_ids=item_ids if new_mode == Mode.SELECTED else None,
            reservation_id=None,
        )
