"""The one in-memory metrics registry shared by every component (passed, never global)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._ingest()
        self._connections()
        self._presence()
        self._web()

    def _ingest(self) -> None:
        r = self.registry
        self.consumed = Counter(
            "rnr_messages_consumed", "AMQP deliveries received", ["queue"], registry=r
        )
        self.stored = Counter(
            "rnr_messages_stored", "Messages committed to PostgreSQL", ["kind"], registry=r
        )
        self.duplicates = Counter(
            "rnr_messages_duplicate",
            "Enhanced messages already stored (node, boot, seq)",
            registry=r,
        )
        self.failed = Counter(
            "rnr_messages_failed", "Messages recorded as failed, by reason", ["reason"], registry=r
        )
        self.acked = Counter("rnr_messages_acked", "AMQP deliveries acked", registry=r)
        self.ack_lost = Counter(
            "rnr_ack_lost",
            "Stored messages whose ack could not be sent (channel gone; "
            "the broker redelivers them and they are deduplicated)",
            registry=r,
        )
        self.batch_size = Histogram(
            "rnr_ingest_batch_size",
            "Messages per committed batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.ingest_latency = Histogram(
            "rnr_ingest_latency_seconds",
            "Delivery received to batch committed",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "rnr_ingest_batch_seconds",
            "Time to write and commit one batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_client = Gauge(
            "rnr_ingest_unacked_in_client", "Deliveries received but not yet acked", registry=r
        )

    def _connections(self) -> None:
        r = self.registry
        self.dependency_up = Gauge(
            "rnr_dependency_up", "1 when the dependency is usable", ["system"], registry=r
        )
        self.reconnects = Counter(
            "rnr_reconnects", "Successful reconnects after a loss", ["system"], registry=r
        )
        self.outages = Counter("rnr_outages", "Times a dependency was lost", ["system"], registry=r)
        self.consumers = Gauge(
            "rnr_amqp_consumers",
            "Consumers the broker confirms on each queue",
            ["queue"],
            registry=r,
        )
        self.confirms_pending = Gauge(
            "rnr_amqp_confirms_pending", "Publishes waiting for a broker confirm", registry=r
        )
        self.published = Counter(
            "rnr_amqp_published", "Publishes confirmed by the broker", ["exchange"], registry=r
        )

    def _presence(self) -> None:
        r = self.registry
        self.nodes = Gauge("rnr_nodes", "Known nodes by presence state", ["state"], registry=r)
        self.presence_transitions = Counter(
            "rnr_presence_transitions",
            "Online/offline transitions",
            ["status", "reason"],
            registry=r,
        )
        self.presence_tick_seconds = Histogram(
            "rnr_presence_tick_seconds",
            "CPU time of one offline-detection tick",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5),
            registry=r,
        )

    def _web(self) -> None:
        r = self.registry
        self.ws_clients = Gauge("rnr_ws_clients", "Connected WebSocket clients", registry=r)
        self.ws_events = Counter(
            "rnr_ws_events_sent", "Events sent to WebSocket clients", registry=r
        )
        self.ws_overflows = Counter(
            "rnr_ws_overflows",
            "Times a slow client's queue overflowed (resync sent)",
            registry=r,
        )
        self.ws_closed_slow = Counter(
            "rnr_ws_closed_slow", "Clients closed for staying too slow", registry=r
        )
        self.ws_disconnects = Counter(
            "rnr_ws_disconnects",
            "WebSocket connections ended (reason: client | send_timeout | too_slow | shutdown)",
            ["reason"],
            registry=r,
        )
        self.relayed = Counter(
            "rnr_ws_relayed",
            "Live events exchanged with other gateways (direction: sent | received)",
            ["direction"],
            registry=r,
        )
        self.relay_dropped = Counter(
            "rnr_ws_relay_dropped",
            "Live events not relayed to other gateways (reason: backlog | oversize | database)",
            ["reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "rnr_http_requests",
            "HTTP requests by route class and status",
            ["route", "status"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (0 when absent): for stats, health and tests."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got

    @staticmethod
    def total(counter: Counter) -> float:
        """A counter's value summed over all its labels."""
        return sum(
            s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total")
        )
