"""The gateway's MQTT client (aiomqtt 2.x): command publishes at QoS 1, reconnect inside.

The first connect happens on entering the context (``async with mqtt``): ``MQTT_MAX_RETRIES``
further attempts ``MQTT_RETRY_DELAY`` apart, then one clear error, before the gateway
starts its tasks. From then on one task (``run``) owns the connection: a new
``aiomqtt.Client`` per attempt (a client is not reusable after a failure), TCP_NODELAY
(Nagle adds ~50 ms to each command round trip on loopback otherwise); a lost connection
is retried for ever, the delay doubling from ``MQTT_RETRY_DELAY`` to 60 s, with jitter.

``publish`` returns only after the broker's PUBACK. Anything else (not connected, timeout,
connection lost while waiting) raises ``PublishUnconfirmed``: the outcome is unknown and
the caller resends with the same message id. A timeout also drops the connection, since
a broker that does not answer on loopback within the timeout is not to be trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import aiomqtt
from prometheus_client import Counter, Gauge, Histogram

from .aio import first_of
from .errors import DependencyUnavailable
from .metrics import LATENCY_BUCKETS, Metrics
from .settings import MqttSettings

log = logging.getLogger(__name__)
SYSTEM = "mqtt"
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
RECONNECT_MAX_S = 60.0
KEEPALIVE_S = 30
MAX_INFLIGHT = 1000


async def _until_disconnected(client: aiomqtt.Client) -> None:
    async for _ in client.messages:  # we subscribe to nothing: this ends on a disconnect
        pass


async def _close(client: aiomqtt.Client) -> None:
    """Disconnect (politely if the connection is still up); errors are of no interest."""
    with contextlib.suppress(aiomqtt.MqttError):
        await client.__aexit__(None, None, None)


async def _collect(watcher: asyncio.Future[None]) -> None:
    """Wait (briefly) for the closed client's disconnect to be seen, so its outcome is
    always retrieved, even for a connection we dropped on purpose."""
    await asyncio.wait({watcher}, timeout=1.0)
    if not watcher.done():
        watcher.cancel()
    elif not watcher.cancelled():
        watcher.exception()


class PublishUnconfirmed(DependencyUnavailable):
    """No PUBACK: the message may or may not have reached the broker."""

    def __init__(self, target: str, cause: str) -> None:
        super().__init__(SYSTEM, target, cause)


class Mqtt:
    def __init__(
        self, settings: MqttSettings, metrics: Metrics, *, client_id: str | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.client_id = client_id or f"rnr-gateway-{secrets.token_hex(4)}"
        self.target = f"{settings.host}:{settings.port}"
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._lost = asyncio.Event()  # replaced per connection; set when it is gone
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._retry = asyncio.Event()
        self.on_restored: list[Callable[[], None]] = []  # after a reconnect succeeded
        self._first: aiomqtt.Client | None = None  # connected by __aenter__, owned by run
        self.connections = 0
        self.connected_at: datetime | None = None  # the current (or last) connection's start
        r = metrics.registry
        self.attempts = Counter(
            "rnr_mqtt_connection_attempts", "MQTT connection attempts", registry=r
        )
        self.publishes = Counter(
            "rnr_mqtt_publishes",
            "MQTT publishes by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.pending = Gauge("rnr_mqtt_pending_publishes", "Publishes awaiting PUBACK", registry=r)
        self.puback_seconds = Histogram(
            "rnr_mqtt_puback_seconds", "Publish to PUBACK", buckets=LATENCY_BUCKETS, registry=r
        )

    # -- connection ----------------------------------------------------------------------
    async def __aenter__(self) -> Mqtt:
        """The first connect: 1 + ``MQTT_MAX_RETRIES`` attempts, then one clear error."""
        failures = 0
        while True:
            try:
                self._first = await self._open()
                return self
            except aiomqtt.MqttError as exc:
                failures += 1
                if failures > self.settings.max_retries:
                    raise DependencyUnavailable(
                        SYSTEM,
                        self.target,
                        f"{exc} (after {failures} attempts; check MQTT_BROKER_HOST/PORT,"
                        " MQTT_USERNAME and the broker's MQTT plugin)",
                    ) from None
                self._log_failure(exc, failures)
                await asyncio.sleep(self.settings.retry_delay_s)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        first, self._first = self._first, None
        if first is not None:  # run() never took it over
            self._down()
            await _close(first)

    def request_stop(self) -> None:
        self._stop.set()

    def reconnect(self) -> None:
        """Drop the current connection; ``run`` opens a new one."""
        self._kick.set()

    def retry_now(self) -> None:
        """Cut the current reconnect wait short (the broker is known to be back)."""
        self._retry.set()

    async def run(self) -> None:
        """Own the connection until stopped: watch it, replace it when lost (with backoff)."""
        client, self._first = self._first, None
        failures = 0
        while not self._stop.is_set():
            if client is None:
                try:
                    client = await self._open()
                except aiomqtt.MqttError as exc:
                    failures += 1
                    self._log_failure(exc, failures)
                    await self._pause(failures)
                    continue
            watcher = asyncio.ensure_future(_until_disconnected(client))
            try:
                await self._watch(watcher)
                failures = 0
            except aiomqtt.MqttError as exc:
                failures = 1
                self._log_failure(exc, failures)
            finally:
                self._down()
                await _close(client)
                client = None
                await _collect(watcher)
            await self._pause(failures)

    async def _open(self) -> aiomqtt.Client:
        self.attempts.inc()
        client = self._new_client()
        await client.__aenter__()  # closed by _close, from the task that owns it
        self._up(client)
        return client

    async def _pause(self, failures: int) -> None:
        if failures and not self._stop.is_set() and not self._retry.is_set():
            delay = min(self.settings.retry_delay_s * 2 ** (failures - 1), RECONNECT_MAX_S)
            await first_of(self._stop, self._retry, within=delay * random.uniform(0.8, 1.2))
        self._retry.clear()

    def _new_client(self) -> aiomqtt.Client:
        password = self.settings.password.value if self.settings.password else None
        client = aiomqtt.Client(
            self.settings.host,
            self.settings.port,
            username=self.settings.username,
            password=password,
            identifier=self.client_id,
            keepalive=KEEPALIVE_S,
            timeout=self.settings.connection_timeout_s,
            socket_options=NODELAY,
            # paho holds back QoS 1 publishes beyond 20 unacked; a broadcast is one burst
            max_inflight_messages=MAX_INFLIGHT,
        )
        # aiomqtt warns at every publish beyond 10 pending; bursts are normal here, and the
        # pending count is a metric (rnr_mqtt_pending_publishes)
        client.pending_calls_threshold = MAX_INFLIGHT
        return client

    def _log_failure(self, exc: BaseException, failures: int) -> None:
        if failures == 1:
            log.warning("MQTT connection to %s failed or lost: %s; retrying", self.target, exc)
        else:
            log.debug("MQTT attempt %d to %s failed: %s", failures, self.target, exc)

    def _up(self, client: aiomqtt.Client) -> None:
        self._client = client
        self._lost = asyncio.Event()
        self._kick.clear()
        self.connected.set()
        self.connected_at = datetime.now(UTC)
        self.metrics.dependency_up.labels(SYSTEM).set(1)
        self.connections += 1
        log.info("MQTT connected to %s as %s", self.target, self.client_id)
        if self.connections > 1:
            self.metrics.reconnects.labels(SYSTEM).inc()
            for callback in self.on_restored:
                callback()

    def _down(self) -> None:
        if self.connected.is_set() and not self._stop.is_set():
            self.metrics.outages.labels(SYSTEM).inc()
        self._client = None
        self._lost.set()
        self.connected.clear()
        self.metrics.dependency_up.labels(SYSTEM).set(0)

    async def _watch(self, watcher: asyncio.Future[None]) -> None:
        """Until the connection drops (raises MqttError), a reconnect is asked for, or stop."""
        waits = {asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._kick.wait())}
        every: set[asyncio.Future[Any]] = {watcher, *waits}
        try:
            await asyncio.wait(every, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        if watcher.done():
            watcher.result()  # a lost connection raises MqttError here
        if self._kick.is_set() and not self._stop.is_set():
            raise aiomqtt.MqttError("connection dropped after an unconfirmed publish")

    # -- publishing ----------------------------------------------------------------------
    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        *,
        kind: str = "command",
    ) -> None:
        """Publish and wait for the PUBACK; ``PublishUnconfirmed`` when it cannot be known."""
        client, lost = self._client, self._lost
        if client is None or not self.connected.is_set():
            self.publishes.labels(kind, "unconfirmed").inc()
            raise PublishUnconfirmed(self.target, "not connected")
        started = time.perf_counter()
        self.pending.inc()
        sending = asyncio.ensure_future(
            client.publish(
                topic, payload, qos=qos, retain=retain, timeout=self.settings.publish_timeout_s
            )
        )
        gone = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({sending, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not sending.done():
                raise PublishUnconfirmed(self.target, "connection lost before the PUBACK")
            sending.result()
        except aiomqtt.MqttError as exc:
            self.publishes.labels(kind, "unconfirmed").inc()
            self.reconnect()
            raise PublishUnconfirmed(self.target, f"no PUBACK: {exc}") from None
        except PublishUnconfirmed:
            self.publishes.labels(kind, "unconfirmed").inc()
            raise
        finally:
            sending.cancel()
            gone.cancel()
            self.pending.dec()
        self.publishes.labels(kind, "confirmed").inc()
        self.puback_seconds.observe(time.perf_counter() - started)

    def stats(self) -> dict[str, Any]:
        """The seed's MQTT publisher stats object, from the counters above."""
        sent = self.metrics.value(
            "rnr_mqtt_publishes_total", {"kind": "command", "result": "confirmed"}
        )
        failed = self.metrics.value(
            "rnr_mqtt_publishes_total", {"kind": "command", "result": "unconfirmed"}
        )
        total = sent + failed
        connected = self.connected.is_set()
        since = self.connected_at
        return {
            "connected": connected,
            "commands_sent": int(sent),
            "commands_failed": int(failed),
            "success_rate_percent": round(100.0 * sent / total, 2) if total else 100.0,
            "pending_publishes": int(self.metrics.value("rnr_mqtt_pending_publishes")),
            "connection_attempts": int(self.metrics.value("rnr_mqtt_connection_attempts_total")),
            # the rest of the seed's get_publisher_stats() fields
            "is_connected": connected,
            "uptime_seconds": (
                round((datetime.now(UTC) - since).total_seconds(), 1)
                if connected and since
                else None
            ),
            "failed_commands_count": int(failed),
            "broker": self.target,
            "qos_level": 1,
            "last_connection": since.isoformat() if since else None,
        }
