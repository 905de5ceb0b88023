"""How an event reaches the pool: handed to this worker's own consumer, or through the broker.

An event is a Celery task that only this worker may run.  Sending it through
the broker to the worker's own queue costs a publish, the broker's round trip
and the consumer's read, a third of a clean failover on a busy machine, and it
cannot run at all while the broker is away.  The worker's consumer runs an
event loop (kombu's ``Hub``) on the worker's main thread, and ``Hub.call_soon``
may be called from any thread and wakes that loop.  So :class:`EventDelivery`
builds the very task message ``send_task`` would publish and hands it to the
consumer's own task handler on that loop: Celery makes the same request of it
(time limits, ``task_received``, ``inspect active``, ``WorkerLostError``) and
sends it to the pool as it would a message from the broker.  Nothing is taken
from a broker, so acknowledging it is a no-op.

A worker with no event loop (the gevent and eventlet pools) sends its events
through the broker to its own queue, as before; so does an event handed over
while the consumer has no handler for the dispatch task (it always has one once
started).
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from celery import Celery
from celery.worker import state as worker_state
from kombu import Queue
from kombu.message import Message
from kombu.serialization import dumps, prepare_accept_content

from .dispatch import EVENT_MESSAGE_EXPIRES
from .outcome import DISPATCH_TASK

logger = logging.getLogger(__name__)


class _NoBroker:
    """The channel of a message no broker delivered: acks and rejects go nowhere."""

    no_ack_consumers = None

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        """Nothing to acknowledge: the message was never taken from a queue."""

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        """Nothing to give back (a rejected event is sent again by the pump, if at all)."""


_NO_BROKER = _NoBroker()
#: The id of the message :meth:`EventDelivery.warm_up` builds and never sends.
WARM_UP_TASK_ID = "celery-stoker-warm-up"


@dataclass(frozen=True)
class _Event:
    """One dispatch task to send: what ``send_task`` would be given."""

    task_id: str
    args: list[Any]
    soft_time_limit: float | None
    time_limit: float | None


class EventDelivery:
    """Sends dispatch tasks to this worker's pool: straight to its consumer when it can."""

    def __init__(self, app: Celery, worker: Any | None, queue_name: str) -> None:
        self.app = app
        self.queue_name = queue_name
        self._worker = worker
        self._handler: Any = None
        self._said_fallback = False
        #: The consumer's restart count at the last publish (see :attr:`_declared_anew`);
        #: a fresh object: none yet.
        self._declared_at: object = object()
        #: Events handed to the loop that it has not taken yet (see :meth:`withdraw`).
        self._waiting: set[str] = set()
        self._lock = threading.Lock()

    @property
    def local(self) -> bool:
        """True when events go straight to the consumer's event loop."""
        return self._hub() is not None

    def send(
        self,
        task_id: str,
        args: list[Any],
        *,
        soft_time_limit: float | None,
        time_limit: float | None,
    ) -> bool:
        """Hand the dispatch task for ``args`` to this worker's pool (any thread).

        True when it went through the broker, False when to the consumer's loop.
        """
        event = _Event(task_id, args, soft_time_limit, time_limit)
        hub = self._hub()
        if hub is None:
            self._publish(event)
            return True
        message = self._message(event)
        with self._lock:
            self._waiting.add(task_id)
        hub.call_soon(self._on_loop, message, event)
        return False

    def warm_up(self) -> None:
        """Build one event's message and throw it away: the first one costs more.

        Celery builds what a task message needs (the protocol's header
        layout, the serializer) on first use: 1.5 ms in a bare process, about
        0.3 ms in a running worker.  A new leader should not pay for that
        while its ``now_leader`` is on the way.
        """
        self._message(_Event(WARM_UP_TASK_ID, [], None, None))

    def withdraw(self, task_id: str) -> bool:
        """Take back an event the consumer's loop has not taken yet; True if it was.

        A stopping worker's loop may never run again (Celery stops it first), and
        an event it never takes would hold the stepping-down leader for its whole
        grace.  A withdrawn event never reaches Celery.  An event sent through the
        broker cannot be taken back (False).
        """
        with self._lock:
            if task_id not in self._waiting:
                return False
            self._waiting.discard(task_id)
            return True

    # ------------------------------------------------------------------ internals

    def _hub(self) -> Any:
        return getattr(self._worker, "hub", None) if self._worker is not None else None

    @cached_property
    def _accept(self) -> set[str]:
        """The content types the worker accepts (its configuration is final once it runs)."""
        return set(prepare_accept_content(self.app.conf.accept_content))

    def _publish(self, event: _Event) -> None:
        consumer: Any = getattr(self._worker, "consumer", None)
        restarts = getattr(consumer, "restart_count", None)
        self.app.send_task(
            DISPATCH_TASK,
            args=event.args,
            task_id=event.task_id,
            queue=self.queue_name,
            expires=EVENT_MESSAGE_EXPIRES,
            ignore_result=True,
            soft_time_limit=event.soft_time_limit,
            time_limit=event.time_limit,
            # None: kombu's own, declared once per connection.
            declare=[self._declared_anew] if restarts != self._declared_at else None,
        )
        self._declared_at = restarts

    @cached_property
    def _declared_anew(self) -> Queue:
        """The event queue, declared by kombu at every publish that names it.

        The broker deletes the queue once its consumer has been away longer
        than its expiry, and drops a publish to a queue that is gone without a
        word.  kombu declares a queue once per connection and remembers it: a
        producer connection that outlived the consumer's absence would never
        declare it again.  So the first publish after each reconnect of the
        consumer names this copy, which kombu does not remember (an explicit
        ``x-expires``, the same as the queue's own), inside the publish's own
        retries.  The consumer declares the queue too, but maybe after.
        """
        queue = copy.copy(self.app.amqp.queues[self.queue_name])
        if queue.expires is not None:  # always, for the queue bootstep.event_queue makes
            expires = {"x-expires": int(queue.expires * 1000)}
            queue.queue_arguments = {**(queue.queue_arguments or {}), **expires}
        return queue

    def _message(self, event: _Event) -> Message:
        """The message ``send_task`` would publish, as the consumer would receive it."""
        app = self.app
        task_message = app.amqp.create_task_message(
            event.task_id,
            DISPATCH_TASK,
            event.args,
            {},
            expires=EVENT_MESSAGE_EXPIRES,
            time_limit=event.time_limit,
            soft_time_limit=event.soft_time_limit,
            ignore_result=True,
        )
        content_type, content_encoding, body = dumps(
            task_message.body, serializer=app.conf.task_serializer
        )
        return Message(
            body=body,
            delivery_tag=event.task_id,
            content_type=content_type,
            content_encoding=content_encoding,
            delivery_info={"exchange": "", "routing_key": self.queue_name},
            properties=dict(task_message.properties),
            headers=task_message.headers,
            accept=self._accept,
            channel=_NO_BROKER,
        )

    def _on_loop(self, message: Message, event: _Event) -> None:
        """On the consumer's event loop: receive the message as if the broker brought it."""
        with self._lock:
            if event.task_id not in self._waiting:
                return  # withdrawn: its term is ending
            self._waiting.discard(event.task_id)
        consumer: Any = getattr(self._worker, "consumer", None)
        strategies = getattr(consumer, "strategies", None) or {}
        if DISPATCH_TASK not in strategies:
            if not self._said_fallback:
                logger.warning(
                    "celery-stoker: the worker's consumer has no handler for %s yet; "
                    "sending events through the broker instead",
                    DISPATCH_TASK,
                )
                self._said_fallback = True
            self._publish(event)
            return
        try:
            if self._handler is None:
                self._handler = consumer.create_task_handler()
            self._handler(message)
        except Exception:
            # Never let an event break the consumer's loop.  If Celery kept no request of
            # it, nothing of it can run: send it the long way.  If it did, it runs (or the
            # pump's watchdog sees it end), and a second copy must not.
            kept = event.task_id in worker_state.requests
            logger.exception(
                "celery-stoker: could not hand event %s to this worker's consumer%s",
                event.task_id,
                "" if kept else "; sending it through the broker",
            )
            if not kept:
                self._publish(event)
