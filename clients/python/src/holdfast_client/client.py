"""The producer client: submit batches over RabbitMQ, follow them, read them over HTTP.

One :class:`Client` holds one AMQP connection with a private reply queue
(server-named, exclusive: it goes away with the connection) and, when given
``http_url``, one HTTP connection pool. Requests go to the exchange
``<namespace>.intake`` with publisher confirms and ``mandatory`` set, so a
request RabbitMQ did not route raises :class:`PublishError` instead of being
lost. Answers are matched to requests by ``correlation_id``.

Built on ``aio-pika`` (asyncio). It is fully typed, keeps the connection's
heartbeats going in the background while the caller does other work (a web
process may sit idle between two clicks), and lets one event loop wait for a
reply, follow events and poll the HTTP API at the same time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
import httpx
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from . import _json as j
from .batches import BatchInfo
from .decisions import Decision, Granted, Insufficient, Rejected
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
from .events import BatchEvent, Completed, Progress, parse_event
from .previews import Preview
from .requests import Batch

log = logging.getLogger("holdfast_client")

#: What :meth:`Client.submit` and :meth:`Client.preview` accept: a
#: :class:`Batch`, a JSON object (a ``dict`` shaped as in docs/messages.md), or
#: the raw body.
Request = Batch | Mapping[str, Any] | bytes

#: Routing keys on ``<namespace>.events`` that :meth:`Client.events` follows.
_EVENT_KEYS = ("decision.*", "batch.progress", "batch.completed")


class Client:
    """A producer of Holdfast batches.

    ``amqp_url`` is the broker (``amqp://user:pass@host:5672/vhost``);
    ``http_url`` the HTTP API of any Holdfast process (``http://host:8080``),
    used by :meth:`batch`, by ``submit(wait=True)`` and by :meth:`events`, with
    ``key`` (an API key of scope producer or reader) as its bearer token.
    ``namespace`` is the fleet's ``HOLDFAST_NAMESPACE``. ``timeout`` (seconds)
    bounds every single wait: a confirm, a decision, a preview, an HTTP
    request. ``poll_interval`` is how often a batch being followed is looked
    up over HTTP.

    Use it as an async context manager::

        async with Client(amqp_url, http_url, key=key) as client:
            decision = await client.submit(batch)
    """

    def __init__(
        self,
        amqp_url: str,
        http_url: str | None = None,
        *,
        key: str | None = None,
        namespace: str = "holdfast",
        timeout: float = 30.0,
        poll_interval: float = 1.0,
        send_user_id: bool = True,
    ) -> None:
        if timeout <= 0 or poll_interval <= 0:
            raise ValueError("timeout and poll_interval must be positive")
        self.namespace = namespace
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._amqp_url = amqp_url
        # RabbitMQ refuses a user_id other than the login, and requires it
        # when the coordinators check account bindings: send the login.
        self._user_id = _login(amqp_url) if send_user_id else None
        self._http_url = http_url
        self._key = key
        self._http: httpx.AsyncClient | None = None
        self._conn: AbstractConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._reply_queue: AbstractQueue | None = None
        self._waiting: dict[str, asyncio.Queue[j.JsonObject]] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to RabbitMQ and open the reply queue (done on first use otherwise)."""
        await self._amqp()

    async def close(self) -> None:
        """Close the connections. Answers still on their way are dropped."""
        conn, self._conn = self._conn, None
        self._publish_channel = None
        self._reply_queue = None
        if conn is not None and not conn.is_closed:
            await conn.close()
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    # ------------------------------------------------------------ the calls

    async def submit(
        self,
        batch: Request,
        *,
        wait: bool = False,
        timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> Decision:
        """Send a batch request and return its decision.

        ``timeout`` bounds the wait for the decision (default: the client's);
        past it, :class:`AnswerTimeout` says that no coordinator answered.
        With ``wait=True``, a :class:`Granted` decision is returned once the
        batch has closed, with its final figures in ``completed`` (like
        ``holdfast submit --wait``); ``wait_timeout`` bounds that wait (default:
        none: every batch closes, at the latest at its ``deadline_at``). The
        summary comes on the reply queue, or, for a batch whose decision was
        replayed, from the HTTP API, which is also polled in case a reply was
        lost: ``wait=True`` needs ``http_url`` for replayed batches.

        Insufficient and rejected are answers, not exceptions. Sending the same
        batch again is safe: the decision is replayed and charged once.
        """
        body, batch_id = _body(batch)
        limit = self.timeout if timeout is None else timeout
        correlation_id = str(uuid.uuid4())
        answers = self._expect(correlation_id)
        try:
            await self._publish("requests", body, correlation_id)
            decision = await self._decision(answers, batch_id, limit)
            if wait and isinstance(decision, Granted):
                completed = await self._completion(decision.batch_id, answers, wait_timeout)
                decision = dataclasses.replace(decision, completed=completed)
            return decision
        finally:
            self._waiting.pop(correlation_id, None)

    async def preview(self, request: Request, *, timeout: float | None = None) -> Preview:
        """Price a batch without holding anything ("7 of 10 fit").

        Takes a :class:`Batch` (its ``batch_id`` is ignored), or the preview
        body of docs/messages.md (``{"account_id", "count", "cost"}`` works too).
        Raises :class:`RequestRejected`, naming each field, for a request that
        cannot be priced (an unknown account, say).
        """
        body, _ = _body(request)
        limit = self.timeout if timeout is None else timeout
        correlation_id = str(uuid.uuid4())
        answers = self._expect(correlation_id)
        try:
            await self._publish("previews", body, correlation_id)
            answer = await self._next(answers, limit, "a preview", None)
        finally:
            self._waiting.pop(correlation_id, None)
        if isinstance(answer, Preview):
            return answer
        if isinstance(answer, Rejected):
            raise RequestRejected(answer)
        raise ProtocolError(f"unexpected answer to a preview: {answer!r}")

    async def batch(self, batch_id: str) -> BatchInfo:
        """The batch as the ledger has it now (``GET /v1/batches/{id}``): state,
        figures, and each item. :class:`NotFound` for a batch that was never
        decided (or was rejected: rejections are not recorded)."""
        path = "/v1/batches/" + urllib.parse.quote(batch_id, safe="")
        return BatchInfo.from_json(await self._get(path))

    async def events(
        self, batch_id: str, *, timeout: float | None = None
    ) -> AsyncIterator[BatchEvent]:
        """Follow a batch: yield its decision, its progress, and its
        :class:`Completed` event, then stop.

        Events come from ``<namespace>.events`` through a private queue when
        the broker user may read that exchange; otherwise (a least-privilege
        producer user) from the HTTP API, polled every ``poll_interval``, with
        a :class:`Progress` whenever the figures change. With ``http_url``,
        the batch is also looked up when following starts and then on every
        ``poll_interval``, so a batch that closed before (or while) the queue
        was bound still ends the iteration. An ``insufficient`` or
        ``rejected`` decision ends it too. ``timeout`` bounds the whole
        iteration (default: none); past it, :class:`AnswerTimeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        events: asyncio.Queue[j.JsonObject] = asyncio.Queue()
        channel = await self._events_channel(events)
        if channel is None and self._http_url is None:
            raise NotConfigured(
                "the broker user may not read the events exchange, and no http_url was given"
            )
        decided = False
        last: Mapping[str, Any] | None = None
        # Look the batch up first (it may have closed before the queue was
        # bound), then every poll interval however busy the exchange is.
        next_look = loop.time()
        try:
            while True:
                info = None
                if self._http_url is not None and loop.time() >= next_look:
                    info = await self._look_up(batch_id)
                    next_look = loop.time() + self.poll_interval
                if info is not None:
                    if not decided:
                        decided = True
                        yield info.decision
                        if not isinstance(info.decision, Granted):
                            return
                    done = info.as_completed()
                    if done is not None:
                        yield done
                        return
                    figures = dataclasses.asdict(info.figures)
                    if channel is None and last is not None and figures != last:
                        yield Progress(
                            raw={"event": "progress", "batch_id": batch_id,
                                 "account_id": info.account_id, **figures},
                            batch_id=batch_id,
                            account_id=info.account_id,
                            figures=info.figures,
                        )
                    last = figures
                wait = None
                if self._http_url is not None:
                    wait = max(next_look - loop.time(), 0.0)
                if deadline is not None:
                    left = deadline - loop.time()
                    if left <= 0:
                        raise AnswerTimeout(
                            f"batch `{batch_id}` did not finish within {timeout} s",
                            batch_id=batch_id,
                            timeout=timeout or 0.0,
                        )
                    wait = left if wait is None else min(wait, left)
                try:
                    message = await asyncio.wait_for(events.get(), wait)
                except asyncio.TimeoutError:
                    continue
                try:
                    event = parse_event(message)
                except ProtocolError as e:
                    # Every batch's events pass here; one this version cannot
                    # read must not end the following of another.
                    log.warning("unreadable event skipped: %s", e)
                    continue
                if getattr(event, "batch_id", None) != batch_id:
                    continue
                if isinstance(event, Decision):
                    if decided:
                        continue  # a replayed decision: said already
                    decided = True
                    yield event
                    if isinstance(event, (Insufficient, Rejected)):
                        return
                elif isinstance(event, Progress):
                    yield event
                elif isinstance(event, Completed):
                    yield event
                    return
        finally:
            if channel is not None and not channel.is_closed:
                await channel.close()

    # ------------------------------------------------------------- internals

    async def _amqp(self) -> AbstractConnection:
        """The connection, with its reply queue consumed; (re)connects when needed."""
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed:
                return self._conn
            try:
                conn = await aio_pika.connect(
                    self._amqp_url,
                    timeout=self.timeout,
                    client_properties={"connection_name": f"holdfast-client/{self.namespace}"},
                )
            except (OSError, aiormq.exceptions.AMQPError, asyncio.TimeoutError) as e:
                raise ConnectionFailed(f"cannot connect to RabbitMQ: {e!r}") from e
            # Replies are consumed on a channel of their own: a publish to a
            # missing exchange closes the publishing channel, never this one.
            channel = await conn.channel(publisher_confirms=False)
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            await queue.consume(self._on_reply, no_ack=True)
            self._conn, self._reply_queue, self._publish_channel = conn, queue, None
            return conn

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        waiting = self._waiting.get(message.correlation_id or "")
        if waiting is None:
            # The answer to a call that gave up (or a summary nobody waits for).
            log.debug("reply for %s dropped: nobody waits for it", message.correlation_id)
            return
        try:
            waiting.put_nowait(j.loads_object(message.body, "a reply"))
        except ProtocolError as e:
            log.warning("unreadable reply for %s: %s", message.correlation_id, e)

    def _expect(self, correlation_id: str) -> asyncio.Queue[j.JsonObject]:
        answers: asyncio.Queue[j.JsonObject] = asyncio.Queue()
        self._waiting[correlation_id] = answers
        return answers

    async def _publish(self, routing_key: str, body: bytes, correlation_id: str) -> None:
        conn = await self._amqp()
        assert self._reply_queue is not None
        exchange_name = f"{self.namespace}.intake"
        if self._publish_channel is None or self._publish_channel.is_closed:
            self._publish_channel = await conn.channel(
                publisher_confirms=True, on_return_raises=True
            )
        # Not declared: the coordinators own the topology (docs/messages.md, "Names").
        exchange = await self._publish_channel.get_exchange(exchange_name, ensure=False)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=self._reply_queue.name,
            correlation_id=correlation_id,
            user_id=self._user_id,
        )
        where = f"exchange `{exchange_name}`, routing key `{routing_key}`"
        try:
            await exchange.publish(
                message, routing_key=routing_key, mandatory=True, timeout=self.timeout
            )
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise PublishError(
                f"{where}: the exchange does not exist (is the namespace `{self.namespace}` "
                f"right, and has a Holdfast coordinator started on this virtual host?): {e}",
                exchange=exchange_name,
                routing_key=routing_key,
            ) from e
        except aiormq.exceptions.ChannelAccessRefused as e:
            raise PublishError(
                f"{where}: RabbitMQ refused the message: {e}",
                exchange=exchange_name,
                routing_key=routing_key,
            ) from e
        except aiormq.exceptions.DeliveryError as e:
            raise PublishError(
                f"{where}: RabbitMQ did not deliver the request to a queue "
                f"(it came back as unroutable, or was refused): {e}",
                exchange=exchange_name,
                routing_key=routing_key,
            ) from e
        except asyncio.TimeoutError as e:
            raise AnswerTimeout(
                f"{where}: RabbitMQ did not confirm the request within {self.timeout} s",
                batch_id=None,
                timeout=self.timeout,
            ) from e
        except aiormq.exceptions.AMQPError as e:
            raise ConnectionFailed(f"{where}: publishing failed: {e!r}") from e

    async def _next(
        self,
        answers: asyncio.Queue[j.JsonObject],
        timeout: float,
        what: str,
        batch_id: str | None,
        left: float | None = None,
    ) -> Decision | Progress | Completed | Preview:
        """The next answer, within ``left`` seconds (default: ``timeout``, which
        is what the error message reports)."""
        try:
            return parse_event(
                await asyncio.wait_for(answers.get(), timeout if left is None else left)
            )
        except asyncio.TimeoutError:
            about = f" for batch `{batch_id}`" if batch_id else ""
            raise AnswerTimeout(
                f"no answer to {what}{about} within {timeout} s: is a Holdfast coordinator "
                f"running on namespace `{self.namespace}`?",
                batch_id=batch_id,
                timeout=timeout,
            ) from None

    async def _decision(
        self, answers: asyncio.Queue[j.JsonObject], batch_id: str | None, timeout: float
    ) -> Decision:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = max(deadline - loop.time(), 0.0)
            answer = await self._next(answers, timeout, "a batch request", batch_id, left)
            if isinstance(answer, Decision):
                return answer
            log.debug("answer before the decision skipped: %r", answer)

    async def _completion(
        self, batch_id: str, answers: asyncio.Queue[j.JsonObject], timeout: float | None
    ) -> Completed:
        """Wait for a granted batch to close: its summary on the reply queue, or
        the HTTP API saying it closed, whichever comes first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            wait = self.poll_interval if self._http_url is not None else None
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise AnswerTimeout(
                        f"batch `{batch_id}` did not finish within {timeout} s",
                        batch_id=batch_id,
                        timeout=timeout or 0.0,
                    )
                wait = left if wait is None else min(wait, left)
            try:
                answer = parse_event(await asyncio.wait_for(answers.get(), wait))
                if isinstance(answer, Completed):
                    return answer
            except asyncio.TimeoutError:
                info = await self._look_up(batch_id)
                done = None if info is None else info.as_completed()
                if done is not None:
                    return done

    async def _look_up(self, batch_id: str) -> BatchInfo | None:
        """The batch over HTTP; ``None`` when there is no HTTP API, the batch is
        not recorded (yet), or the API is briefly unavailable."""
        if self._http_url is None:
            return None
        try:
            return await self.batch(batch_id)
        except NotFound:
            return None
        except ConnectionFailed as e:
            log.debug("looking up batch %s: %s", batch_id, e)
            return None
        except ApiError as e:
            if e.status >= 500 or e.status == 429:
                log.debug("looking up batch %s: %s", batch_id, e)
                return None
            raise

    async def _events_channel(
        self, into: asyncio.Queue[j.JsonObject]
    ) -> AbstractChannel | None:
        """A channel consuming a private queue bound to the events exchange, or
        ``None`` when the broker user may not read that exchange."""
        conn = await self._amqp()
        channel: AbstractChannel = await conn.channel(publisher_confirms=False)
        try:
            queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
            for key in _EVENT_KEYS:
                await queue.bind(f"{self.namespace}.events", routing_key=key)
        except aiormq.exceptions.ChannelAccessRefused as e:
            log.debug("events exchange not readable (%s); following over HTTP", e)
            return None
        except aiormq.exceptions.ChannelNotFoundEntity as e:
            raise PublishError(
                f"the exchange `{self.namespace}.events` does not exist: has a Holdfast "
                f"coordinator started on namespace `{self.namespace}`?",
                exchange=f"{self.namespace}.events",
                routing_key="",
            ) from e

        async def deliver(message: AbstractIncomingMessage) -> None:
            try:
                into.put_nowait(j.loads_object(message.body, "an event"))
            except ProtocolError as e:
                log.warning("unreadable event: %s", e)

        await queue.consume(deliver, no_ack=True)
        return channel

    async def _get(self, path: str) -> j.JsonObject:
        if self._http_url is None:
            raise NotConfigured("this call uses the HTTP API: give the Client an http_url")
        if self._http is None:
            headers = {"Accept": "application/json"}
            if self._key is not None:
                headers["Authorization"] = f"Bearer {self._key}"
            self._http = httpx.AsyncClient(
                base_url=self._http_url, headers=headers, timeout=self.timeout
            )
        try:
            response = await self._http.get(path)
        except httpx.TransportError as e:
            raise ConnectionFailed(f"GET {path}: {e!r}") from e
        if response.is_success:
            return j.loads_object(response.content, f"GET {path}")
        try:
            problem = json.loads(response.content)
        except ValueError:
            problem = {"detail": response.text[:200]}
        if not isinstance(problem, dict):
            problem = {}
        if response.status_code == 404:
            raise NotFound(404, problem)
        raise ApiError(response.status_code, problem)


def _body(request: Request) -> tuple[bytes, str | None]:
    """The body to send, and the batch id it names (for messages)."""
    if isinstance(request, Batch):
        return json.dumps(request.to_json()).encode(), request.batch_id
    if isinstance(request, bytes):
        return request, None
    batch_id = request.get("batch_id")
    return json.dumps(dict(request)).encode(), batch_id if isinstance(batch_id, str) else None


def _login(amqp_url: str) -> str:
    """The user name the connection logs in with (RabbitMQ's default: guest)."""
    user = urllib.parse.urlsplit(amqp_url).username
    return urllib.parse.unquote(user) if user else "guest"


__all__ = ["Client", "Request"]
