"""The coordinator's answer to a batch request: granted, insufficient or rejected.

Each decision keeps the JSON it was read from in ``raw`` (fields this version
does not know included). ``insufficient`` carries its options as objects
that build the follow-up request (docs/messages.md, "Decisions").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import _json as j
from .errors import ProtocolError
from .requests import Batch, Mode

if TYPE_CHECKING:
    from .events import Completed


@dataclasses.dataclass(frozen=True, kw_only=True)
class Draw:
    """What a batch draws (or would draw) from one grant of the account."""

    grant_id: str
    #: ``plan``, ``purchase``, ``promotion`` or ``manual``.
    source: str
    amount: int
    expires_at: str | None = None

    @classmethod
    def from_json(cls, d: j.JsonObject) -> Draw:
        return cls(
            grant_id=j.string(d, "grant_id"),
            source=j.string(d, "source"),
            amount=j.integer(d, "amount"),
            expires_at=j.opt_string(d, "expires_at"),
        )


def _draws(d: j.JsonObject) -> tuple[Draw, ...]:
    return tuple(Draw.from_json(x) for x in j.objects(d, "breakdown"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitSet:
    """A subset of the items that the available credits cover."""

    count: int
    cost: int
    item_ids: tuple[str, ...]

    @classmethod
    def from_json(cls, d: j.JsonObject) -> FitSet:
        return cls(
            count=j.integer(d, "count"),
            cost=j.integer(d, "cost"),
            item_ids=j.strings(d, "item_ids"),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Level:
    """A level a batch must fit: the account, or a spender's limit."""

    #: ``account`` or ``spender``.
    level: str
    spender_id: str | None = None
    kind: str | None = None
    limit: int | None = None
    period: str | None = None
    used: int | None = None
    held: int | None = None
    remaining: int | None = None
    resets_at: str | None = None

    @classmethod
    def from_json(cls, d: j.JsonObject) -> Level:
        return cls(
            level=j.string(d, "level"),
            spender_id=j.opt_string(d, "spender_id"),
            kind=j.opt_string(d, "kind"),
            limit=j.opt_integer(d, "limit"),
            period=j.opt_string(d, "period"),
            used=j.opt_integer(d, "used"),
            held=j.opt_integer(d, "held"),
            remaining=j.opt_integer(d, "remaining"),
            resets_at=j.opt_string(d, "resets_at"),
        )

    @classmethod
    def maybe(cls, d: j.JsonObject, key: str) -> Level | None:
        found = j.opt_obj(d, key)
        return None if found is None else cls.from_json(found)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeftOut:
    """An item of a granted batch that does not run, and why."""

    item_id: str
    #: ``did_not_fit`` or ``not_selected``.
    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class FieldError:
    """One problem with a request, naming the field (a JSON path such as ``items[3].estimated_cost``)."""

    field: str
    reason: str


# ---------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True, kw_only=True)
class Option:
    """One thing a person can do about an ``insufficient`` decision."""

    #: ``generate_first_fit``, ``select_items``, ``add_credits``, ``raise_limit``, or one this version does not know.
    action: str
    #: The text for the button: "Generate the first 8".
    label: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateFirstFit(Option):
    """Run the longest prefix of the items that fits."""

    #: How many items would run.
    item_count: int
    #: What they cost.
    credits: int

    def request(self, batch: Batch, *, batch_id: str | None = None) -> Batch:
        """The request to send for this option: the same items (for a
        ``selected`` batch, the selected ones) with ``mode: first_fit`` and a
        new ``batch_id``."""
        if batch.mode == Mode.SELECTED and batch.item_ids is not None:
            chosen = set(batch.item_ids)
            batch = dataclasses.replace(
                batch, items=[i for i in batch.items if i.item_id in chosen], item_ids=None
            )
        return batch.again(mode=Mode.FIRST_FIT, batch_id=batch_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectItems(Option):
    """Let the person pick the items to run."""

    def request(
        self, batch: Batch, item_ids: Sequence[str], *, batch_id: str | None = None
    ) -> Batch:
        """The request to send once the person picked ``item_ids``: every item,
        ``mode: selected``, and a new ``batch_id``."""
        return batch.again(mode=Mode.SELECTED, item_ids=list(item_ids), batch_id=batch_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AddCredits(Option):
    """Add credits to the account, then try again."""

    #: The shortfall.
    credits: int

    def request(self, batch: Batch, *, batch_id: str | None = None) -> Batch:
        """The request to send once the credits are in: the same batch with a
        new ``batch_id`` (the old one stays denied)."""
        return batch.again(batch_id=batch_id)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RaiseLimit(Option):
    """Ask an admin to raise the limit of the spender that binds."""

    #: The shortfall.
    credits: int
    spender_id: str

    def request(self, batch: Batch, *, batch_id: str | None = None) -> Batch:
        """The request to send once the limit is raised: a new ``batch_id``."""
        return batch.again(batch_id=batch_id)


def _option(d: j.JsonObject) -> Option:
    action = j.string(d, "action")
    label = j.string(d, "label")
    if action == "generate_first_fit":
        return GenerateFirstFit(
            action=action,
            label=label,
            item_count=j.integer(d, "item_count"),
            credits=j.integer(d, "credits"),
        )
    if action == "select_items":
        return SelectItems(action=action, label=label)
    if action == "add_credits":
        return AddCredits(action=action, label=label, credits=j.integer(d, "credits"))
    if action == "raise_limit":
        return RaiseLimit(
            action=action,
            label=label,
            credits=j.integer(d, "credits"),
            spender_id=j.string(d, "spender_id"),
        )
    # An action added after this version: still shown, with its label.
    return Option(action=action, label=label)


# -------------------------------------------------------------- decisions


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision:
    """The answer to a batch request. Use ``isinstance`` (or ``match``) on
    :class:`Granted`, :class:`Insufficient` and :class:`Rejected`."""

    batch_id: str | None
    account_id: str | None
    #: The decision as received, every field included.
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)

    @property
    def kind(self) -> str:
        """``granted``, ``insufficient`` or ``rejected``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class Granted(Decision):
    """The hold is taken and the item jobs are dispatched."""

    batch_id: str
    account_id: str
    mode: str
    hold_id: str
    #: Credits held for the items that run (sequential: the first chunk).
    reserved: int
    items_total: int
    #: The items that run, in request order.
    item_ids: tuple[str, ...]
    #: The items that do not run, and why. Never silent.
    left_out: tuple[LeftOut, ...]
    #: RFC 3339: past it, unsettled items fail and the rest is released.
    deadline_at: str
    chunk_size: int | None = None
    breakdown: tuple[Draw, ...] = ()
    message: str = ""
    expiry_notice: str | None = None
    #: The batch's final figures, when it was submitted with ``wait=True``.
    completed: Completed | None = None

    @property
    def kind(self) -> str:
        return "granted"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Insufficient(Decision):
    """Nothing was held and nothing runs; the person chooses among :attr:`options`."""

    batch_id: str
    account_id: str
    mode: str
    total_cost: int
    available: int
    shortfall: int
    #: N of "k out of N".
    items_total: int
    #: k of "k out of N".
    fit_count: int
    first_fit: FitSet
    priority_fit: FitSet
    #: "You have enough credits to generate 8 out of 10 items."
    message: str
    #: "This action costs 120 credits. You have 100 credits available (20 short)."
    detail: str
    #: The choices to offer, in order.
    options: tuple[Option, ...]
    breakdown: tuple[Draw, ...] = ()
    limited_by: Level | None = None

    @property
    def kind(self) -> str:
        return "insufficient"

    def _find(self, kind: type[Option]) -> Option | None:
        return next((o for o in self.options if type(o) is kind), None)

    @property
    def generate_first_fit(self) -> GenerateFirstFit | None:
        """The ``generate_first_fit`` option, when at least one item fits."""
        found = self._find(GenerateFirstFit)
        return found if isinstance(found, GenerateFirstFit) else None

    @property
    def select_items(self) -> SelectItems | None:
        """The ``select_items`` option (always offered)."""
        found = self._find(SelectItems)
        return found if isinstance(found, SelectItems) else None

    @property
    def add_credits(self) -> AddCredits | None:
        """The ``add_credits`` option, when the account's credits bind."""
        found = self._find(AddCredits)
        return found if isinstance(found, AddCredits) else None

    @property
    def raise_limit(self) -> RaiseLimit | None:
        """The ``raise_limit`` option, when a spender's limit binds."""
        found = self._find(RaiseLimit)
        return found if isinstance(found, RaiseLimit) else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rejected(Decision):
    """The request could not be decided as sent; nothing was held."""

    #: One line: every error as ``field: reason``, joined by ``; ``.
    reason: str
    errors: tuple[FieldError, ...]

    @property
    def kind(self) -> str:
        return "rejected"

    @property
    def fields(self) -> tuple[str, ...]:
        """The fields at fault, in the order reported."""
        return tuple(e.field for e in self.errors)

    def error_for(self, field: str) -> str | None:
        """The reason given for ``field``, if it is at fault."""
        return next((e.reason for e in self.errors if e.field == field), None)


def parse_decision(d: j.JsonObject) -> Decision:
    """Read a decision (the ``decision`` field says which)."""
    kind = j.string(d, "decision")
    if kind == "granted":
        return Granted(
            raw=d,
            batch_id=j.string(d, "batch_id"),
            account_id=j.string(d, "account_id"),
            mode=j.string(d, "mode"),
            hold_id=j.string(d, "hold_id"),
            reserved=j.integer(d, "reserved"),
            items_total=j.integer(d, "items_total"),
            item_ids=j.strings(d, "item_ids"),
            left_out=tuple(
                LeftOut(item_id=j.string(x, "item_id"), reason=j.string(x, "reason"))
                for x in j.objects(d, "left_out")
            ),
            deadline_at=j.string(d, "deadline_at"),
            chunk_size=j.opt_integer(d, "chunk_size"),
            breakdown=_draws(d),
            message=j.opt_string(d, "message") or "",
            expiry_notice=j.opt_string(d, "expiry_notice"),
        )
    if kind == "insufficient":
        return Insufficient(
            raw=d,
            batch_id=j.string(d, "batch_id"),
            account_id=j.string(d, "account_id"),
            mode=j.string(d, "mode"),
            total_cost=j.integer(d, "total_cost"),
            available=j.integer(d, "available"),
            shortfall=j.integer(d, "shortfall"),
            items_total=j.integer(d, "items_total"),
            fit_count=j.integer(d, "fit_count"),
            first_fit=FitSet.from_json(j.obj(d, "first_fit")),
            priority_fit=FitSet.from_json(j.obj(d, "priority_fit")),
            message=j.string(d, "message"),
            detail=j.opt_string(d, "detail") or "",
            options=tuple(_option(o) for o in j.objects(d, "options")),
            breakdown=_draws(d),
            limited_by=Level.maybe(d, "limited_by"),
        )
    if kind == "rejected":
        return rejected_from(d)
    raise ProtocolError(f"unknown decision `{kind}`")


def rejected_from(d: j.JsonObject) -> Rejected:
    """A rejection: a ``rejected`` decision, or an HTTP problem document with ``errors``."""
    errors = tuple(
        FieldError(field=j.string(e, "field"), reason=j.string(e, "reason"))
        for e in j.objects(d, "errors")
    )
    reason = j.opt_string(d, "reason") or "; ".join(f"{e.field}: {e.reason}" for e in errors)
    return Rejected(
        raw=d,
        batch_id=j.opt_string(d, "batch_id"),
        account_id=j.opt_string(d, "account_id"),
        reason=reason,
        errors=errors,
    )
