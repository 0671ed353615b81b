"""What can go wrong, as exceptions that say what to do.

Every exception the client raises on purpose is a :class:`HoldfastError`.
A decision of ``insufficient`` or ``rejected`` is *not* an exception: it is
the answer, returned as a :class:`~holdfast_client.Decision`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .decisions import FieldError, Rejected


class HoldfastError(Exception):
    """Base class of every error this package raises."""


class ProtocolError(HoldfastError):
    """A message from Holdfast could not be read (a missing or mistyped field)."""


class PublishError(HoldfastError):
    """RabbitMQ did not take a request: nothing was sent, so nothing was decided.

    Raised when the exchange does not exist (wrong namespace, or no Holdfast
    role has started on this virtual host yet), when the message could not be
    routed to a queue (it came back as ``mandatory``), or when the broker
    refused it (a negative confirm, for example a full queue). Safe to retry
    with the same ``batch_id``.
    """

    def __init__(self, message: str, *, exchange: str, routing_key: str) -> None:
        super().__init__(message)
        self.exchange = exchange
        self.routing_key = routing_key


class AnswerTimeout(HoldfastError, TimeoutError):
    """No answer came within the time allowed.

    For a batch request this means no coordinator answered: none is running on
    this namespace, or they are all busy. The request may still be decided
    later; sending it again with the same ``batch_id`` is safe (the decision
    is replayed, nothing is reserved twice).
    """

    def __init__(self, message: str, *, batch_id: str | None, timeout: float) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.timeout = timeout


class RequestRejected(HoldfastError):
    """A preview could not be priced as sent: :attr:`rejected` names each field."""

    def __init__(self, rejected: Rejected) -> None:
        super().__init__(rejected.reason)
        self.rejected = rejected

    @property
    def errors(self) -> tuple[FieldError, ...]:
        """One entry per problem, each naming its field."""
        return self.rejected.errors


class ApiError(HoldfastError):
    """The HTTP API answered with an error (an ``application/problem+json`` document)."""

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        title = problem.get("title") or f"HTTP {status}"
        detail = problem.get("detail")
        super().__init__(f"{status} {title}: {detail}" if detail else f"{status} {title}")
        self.status = status
        self.problem = problem
        self.type: str | None = problem.get("type") if isinstance(problem.get("type"), str) else None
        errors = problem.get("errors")
        self.errors: Sequence[Mapping[str, Any]] = errors if isinstance(errors, list) else []


class NotFound(ApiError):
    """HTTP 404: no such batch (or account, or reservation)."""


class ConnectionFailed(HoldfastError, ConnectionError):
    """RabbitMQ or the HTTP API could not be reached (or the connection was lost)."""


class NotConfigured(HoldfastError):
    """The operation needs a setting the client was not given (``http_url``, ``key``)."""
