# Node logic shared by the firmware (MicroPython) and its tests (CPython): payloads in the
# enhanced format and the command rules of the protocol (acks, expiry, duplicates).
# No MicroPython-only import here.

try:
    import ujson as json  # MicroPython
except ImportError:  # CPython (tests)
    import json

FIRMWARE_VERSION = "1.0.0"
SEEN_IDS = 32  # message ids remembered for duplicate detection


class Node:
    def __init__(self, node_id, boot, clock, actuators):
        """clock() -> epoch seconds or None before NTP; actuators: action -> fn(params)."""
        self.node_id = node_id
        self.boot = boot
        self.seq = 0
        self.clock = clock
        self.actuators = actuators
        self.seen = []  # ids executed (or refused), oldest first

    def topic(self, channel):
        return "devices/%s/%s" % (self.node_id, channel)

    def message(self, fields):
        """Legacy fields plus enhanced metadata; ``seq`` increments per message."""
        body = dict(fields)
        body["node_id"] = self.node_id
        body["boot"] = self.boot
        body["seq"] = self.seq
        body["fw"] = FIRMWARE_VERSION
        now = self.clock()
        if now is not None:
            body["ts"] = now
        self.seq += 1
        return json.dumps(body)

    def online(self):
        return json.dumps({"status": "online", "node_id": self.node_id, "fw": FIRMWARE_VERSION})

    def will(self):
        return json.dumps({"status": "offline", "reason": "lwt"})

    def handle(self, raw):
        """A command payload in, the acks to publish out (JSON strings, in order)."""
        try:
            command = json.loads(raw)
            message_id = command["message_id"]
            action = command["action"]
        except (ValueError, KeyError, TypeError):
            return []  # an empty retained clear, or garbage: nothing to ack
        if message_id in self.seen:
            return [self._ack(message_id, "duplicate", "already executed")]
        expires_at = command.get("expires_at")
        now = self.clock()
        if expires_at is not None and now is not None and now > expires_at:
            self._remember(message_id)
            return [self._ack(message_id, "expired", "past expires_at")]
        handler = self.actuators.get(action)
        if handler is None:
            self._remember(message_id)
            return [self._ack(message_id, "rejected", "unknown action " + str(action))]
        acks = [self._ack(message_id, "received", "")]
        try:
            handler(command)
        except Exception as exc:  # a failing actuator is reported, never fatal
            acks.append(self._ack(message_id, "failed", str(exc)))
        else:
            acks.append(self._ack(message_id, "executed", ""))
        self._remember(message_id)
        return acks

    def _remember(self, message_id):
        self.seen.append(message_id)
        if len(self.seen) > SEEN_IDS:
            self.seen.pop(0)

    def _ack(self, message_id, status, detail):
        return json.dumps({"message_id": message_id, "status": status, "detail": detail})
