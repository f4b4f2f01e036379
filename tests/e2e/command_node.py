"""A test node: a real MQTT client that receives commands on ``devices/{id}/commands``
and acks on ``devices/{id}/ack`` the way new firmware does (PROTOCOL §4.2): ``received``
at once, then the outcome; ``duplicate`` for a message id it already executed. It can
hold its acks (``hold``), delay them, answer with another outcome, or send none at all
(legacy firmware), and it records everything it got. It may listen on other topics than
``commands`` (``topics``), e.g. only the retained ``commands/last`` of a node that
reconnects with a clean session, and leave without saying so (``goodbye=False``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiomqtt
import orjson

from rnr_gateway.command_codec import CommandRecord
from rnr_gateway.gateway import Gateway
from rnr_gateway.settings import CommandSettings, Settings
from tests.conftest import eventually, mqtt_client

FINISHED = frozenset(("executed", "failed", "rejected", "expired", "cancelled"))
FAST = CommandSettings(
    ack_timeout_s=1.5, exec_timeout_s=5.0, sweep_interval_s=0.1, infer_window_s=5
)


def fast(settings: Settings) -> Settings:
    """Test timings: short ack timeout, quick sweep, 1 s MQTT publish timeout."""
    return replace(settings, mqtt=replace(settings.mqtt, publish_timeout_s=1.0), commands=FAST)


async def settled(
    gw: Gateway, mid: str, states: frozenset[str] = FINISHED, within: float = 10
) -> CommandRecord:
    return await eventually(lambda: gw.commands.get(mid), lambda r: r.status in states, within)


def statuses(record: CommandRecord) -> list[str]:
    return [e.status for e in record.events]


@dataclass
class NodeLog:
    received: list[dict[str, Any]] = field(default_factory=list)  # every copy, in order
    # per copy in ``received``: the topic (under devices/{id}/) and the MQTT retain flag
    via: list[tuple[str, bool]] = field(default_factory=list)
    empty: int = 0  # empty messages (a retained copy being cleared), not commands
    executed: dict[str, int] = field(default_factory=dict)  # message id → times executed
    outstanding: int = 0  # commands received and not yet finished
    max_outstanding: int = 0

    @property
    def ids(self) -> list[str]:
        return [c["message_id"] for c in self.received]


class TestNode:
    __test__ = False  # not a test class

    def __init__(
        self,
        settings: Settings,
        node_id: str,
        *,
        outcome: str = "executed",
        acks: bool = True,
        ack_delay_s: float = 0.0,
        log: NodeLog | None = None,
        announce: bool = True,
        topics: tuple[str, ...] = ("commands",),
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.outcome = outcome
        self.acks = acks
        self.ack_delay_s = ack_delay_s
        self.log = log or NodeLog()
        self.announce = announce  # an `online` status message once connected
        self.topics = topics  # subscribed to, under devices/{id}/
        self.hold = asyncio.Event()  # cleared: acks wait (commands stay in flight)
        self.hold.set()
        self.client: aiomqtt.Client | None = None
        self._in_progress: set[str] = set()
        self._workers: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def connected(
        self, gateway: Gateway | None = None, *, goodbye: bool = True
    ) -> AsyncIterator[TestNode]:
        """Connect, subscribe, say online (and wait until the gateway sees it online).

        On leaving, an `offline` status unless ``goodbye`` is false: then the node just
        disconnects (cleanly, so no will either) and presence thinks it online until its
        offline threshold passes."""
        will = aiomqtt.Will(
            f"devices/{self.node_id}/status",
            orjson.dumps({"status": "offline", "reason": "lwt"}),
            qos=1,
        )
        async with mqtt_client(self.settings, f"node-{self.node_id}", will=will) as client:
            self.client = client
            for topic in self.topics:
                await client.subscribe(f"devices/{self.node_id}/{topic}", qos=1)
            reader = asyncio.create_task(self._read(client))
            if self.announce:
                await client.publish(
                    f"devices/{self.node_id}/status",
                    orjson.dumps({"status": "online", "node_id": self.node_id}),
                    qos=1,
                )
            if gateway is not None:
                await eventually(lambda: gateway.presence.is_online(self.node_id), bool, 10)
            try:
                yield self
            finally:
                with contextlib.suppress(aiomqtt.MqttError):
                    if goodbye:
                        await client.publish(
                            f"devices/{self.node_id}/status",
                            orjson.dumps({"status": "offline", "reason": "shutdown"}),
                            qos=1,
                        )
                reader.cancel()
                for worker in self._workers:
                    worker.cancel()
                self.client = None

    async def _read(self, client: aiomqtt.Client) -> None:
        prefix = f"devices/{self.node_id}/"
        async for message in client.messages:
            if not message.payload:
                self.log.empty += 1
                continue
            command = orjson.loads(message.payload)  # type: ignore[arg-type]
            self.log.received.append(command)
            self.log.via.append((message.topic.value.removeprefix(prefix), message.retain))
            task = asyncio.create_task(self._handle(client, command))
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _handle(self, client: aiomqtt.Client, command: dict[str, Any]) -> None:
        mid = command["message_id"]
        if mid in self.log.executed:
            await self._ack(client, mid, "duplicate")
            return
        if mid in self._in_progress:
            return  # a second copy while the first is being carried out
        self._in_progress.add(mid)
        self.log.outstanding += 1
        self.log.max_outstanding = max(self.log.max_outstanding, self.log.outstanding)
        await self.hold.wait()
        await asyncio.sleep(self.ack_delay_s)
        await self._ack(client, mid, "received")
        if self.outcome == "executed":
            self.log.executed[mid] = self.log.executed.get(mid, 0) + 1
        self.log.outstanding -= 1
        self._in_progress.discard(mid)
        await self._ack(client, mid, self.outcome, f"test node: {self.outcome}")

    async def _ack(self, client: aiomqtt.Client, mid: str, status: str, detail: str = "") -> None:
        if not self.acks:
            return
        body: dict[str, Any] = {"message_id": mid, "status": status}
        if detail:
            body["detail"] = detail
        await client.publish(f"devices/{self.node_id}/ack", orjson.dumps(body), qos=1)

    async def send(self, channel: str, body: dict[str, Any] | bytes) -> None:
        assert self.client is not None
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.client.publish(f"devices/{self.node_id}/{channel}", payload, qos=1)
