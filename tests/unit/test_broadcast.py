from __future__ import annotations

import orjson

from rnr_gateway.broadcast import CLOSE, MAX_OVERFLOWS, RESYNC, Hub
from rnr_gateway.metrics import Metrics


async def test_slow_client_gets_resync_and_never_blocks_others() -> None:
    hub = Hub(Metrics(), queue_size=5)
    fast, slow = hub.connect(), hub.connect()
    received = []
    for i in range(12):
        hub.publish({"type": "sensor_data", "node_id": "N", "i": i})
        received.append(orjson.loads(fast.queue.get_nowait())["i"])
    assert received == list(range(12))
    frames = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert RESYNC in frames
    assert slow.queue.qsize() == 0 and len(frames) <= 5
    assert hub.metrics.value("rnr_ws_overflows_total") >= 1


async def test_client_overflowing_repeatedly_is_closed() -> None:
    hub = Hub(Metrics(), queue_size=2)
    stuck = hub.connect()
    for i in range(2 + 3 * MAX_OVERFLOWS):
        hub.publish({"type": "stats", "i": i})
    assert stuck.closing
    assert stuck.queue.get_nowait() == CLOSE
    assert hub.metrics.value("rnr_ws_closed_slow_total") == 1


async def test_subscription_filters_nodes_and_types() -> None:
    hub = Hub(Metrics())
    client = hub.connect()
    client.subscribe(["A"], ["node_status"])
    hub.publish({"type": "node_status", "node_id": "A"})
    hub.publish({"type": "node_status", "node_id": "B"})
    hub.publish({"type": "sensor_data", "node_id": "A"})
    assert [orjson.loads(client.queue.get_nowait())["node_id"]] == ["A"]
    assert client.queue.empty()
