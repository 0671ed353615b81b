"""A quota preview: "this costs ~120, you have 95, 7 of 10 fit". Holds nothing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from . import _json as j
from .decisions import Draw, FitSet, Level


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preview:
    """What a batch would cost, what the account has, and what fits."""

    account_id: str
    mode: str
    total_cost: int
    available: int
    #: True when the batch would be granted as it stands.
    fits: bool
    items_total: int
    #: k of "k out of N" (N when everything fits).
    fit_count: int
    first_fit: FitSet
    priority_fit: FitSet
    #: Credits missing for everything (0 when it fits).
    shortfall: int
    #: "This action will cost ~120 credits. You have 95 credits."
    message: str
    #: When short: "You have enough credits to generate 7 out of 10 items."
    advice: str | None = None
    breakdown: tuple[Draw, ...] = ()
    expiry_notice: str | None = None
    spender_id: str | None = None
    levels: tuple[Level, ...] = ()
    limited_by: Level | None = None
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, d: j.JsonObject) -> Preview:
        return cls(
            raw=d,
            account_id=j.string(d, "account_id"),
            mode=j.string(d, "mode"),
            total_cost=j.integer(d, "total_cost"),
            available=j.integer(d, "available"),
            fits=j.boolean(d, "fits"),
            items_total=j.integer(d, "items_total"),
            fit_count=j.integer(d, "fit_count"),
            first_fit=FitSet.from_json(j.obj(d, "first_fit")),
            priority_fit=FitSet.from_json(j.obj(d, "priority_fit")),
            shortfall=j.integer(d, "shortfall"),
            message=j.string(d, "message"),
            advice=j.opt_string(d, "advice"),
            breakdown=tuple(Draw.from_json(x) for x in j.objects(d, "breakdown")),
            expiry_notice=j.opt_string(d, "expiry_notice"),
            spender_id=j.opt_string(d, "spender_id"),
            levels=tuple(Level.from_json(x) for x in j.objects(d, "levels")),
            limited_by=Level.maybe(d, "limited_by"),
        )
