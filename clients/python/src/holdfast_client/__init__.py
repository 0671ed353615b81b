"""Holdfast producer client: submit "Generate All" batches and follow them.

    from holdfast_client import Batch, Client, Granted, Insufficient, Item

    async with Client("amqp://guest:guest@127.0.0.1:5672/%2f",
                      "http://127.0.0.1:8080", key=API_KEY) as client:
        batch = Batch("acme", [Item(f"photo-{i}", 12) for i in range(10)])
        decision = await client.submit(batch)

See the package README and docs/messages.md in the Holdfast repository.
"""

from .batches import BatchInfo, ItemInfo
from .client import Client, Request
from .decisions import (
    AddCredits,
    Decision,
    Draw,
    FieldError,
    FitSet,
    GenerateFirstFit,
    Granted,
    Insufficient,
    LeftOut,
    Level,
    Option,
    RaiseLimit,
    Rejected,
    SelectItems,
)
from .errors import (
    AnswerTimeout,
    ApiError,
    ConnectionFailed,
    HoldfastError,
    NotConfigured,
    NotFound,
    ProtocolError,
    PublishError,
    RequestRejected,
)
from .events import BatchEvent, BatchFigures, Completed, Progress, parse_event
from .previews import Preview
from .requests import REQUEST_SCHEMA_VERSION, Batch, Item, Mode, new_batch_id

__version__ = "0.1.0"

__all__ = [
    "REQUEST_SCHEMA_VERSION",
    "AddCredits",
    "AnswerTimeout",
    "ApiError",
    "Batch",
    "BatchEvent",
    "BatchFigures",
    "BatchInfo",
    "Client",
    "Completed",
    "ConnectionFailed",
    "Decision",
    "Draw",
    "FieldError",
    "FitSet",
    "GenerateFirstFit",
    "Granted",
    "HoldfastError",
    "Insufficient",
    "Item",
    "ItemInfo",
    "LeftOut",
    "Level",
    "Mode",
    "NotConfigured",
    "NotFound",
    "Option",
    "Preview",
    "Progress",
    "ProtocolError",
    "PublishError",
    "RaiseLimit",
    "Rejected",
    "Request",
    "RequestRejected",
    "SelectItems",
    "new_batch_id",
    "parse_event",
]
