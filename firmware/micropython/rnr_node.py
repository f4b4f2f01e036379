# Node logic shared by the firmware (MicroPython) and its tests (CPython): payloads in the
# enhanced format and the command rules of the protocol (acks, expiry, duplicates).
# No MicroPython-only import here; clock, storage, publish and reset are injected.

try:
    import ujson as json  # MicroPython
except ImportError:  # CPython (tests)
    import json

try:
    import os
except ImportError:  # older MicroPython ports
    import uos as os

FIRMWARE_VERSION = "1.1.0"
SEEN_IDS = 32  # message ids remembered (in flash) for duplicate detection
NTP_RETRY_S = 60  # NTP attempts while the clock is not set
NTP_RESYNC_S = 3600  # NTP attempts once it is


def ntp_interval_s(synced):
    """Seconds until the next NTP attempt."""
    return NTP_RESYNC_S if synced else NTP_RETRY_S


class SeenStore:
    """The last message ids handled, as a JSON list in flash, replaced atomically."""

    def __init__(self, path):
        self.path = path
        self.tmp = path + ".tmp"

    def load(self):
        # the temporary copy only matters if a rename was cut short (FAT removes the old
        # file before renaming): it is complete, since it is renamed only once closed
        for name in (self.path, self.tmp):
            try:
                with open(name) as f:
                    ids = json.loads(f.read())
            except (OSError, ValueError):
                continue
            if isinstance(ids, list):
                return ids[-SEEN_IDS:]
        return []

    def save(self, ids):
        with open(self.tmp, "w") as f:
            f.write(json.dumps(ids))
        os.rename(self.tmp, self.path)


class Node:
    def __init__(self, node_id, boot, clock, actuators, storage=None, publish=None, reset=None):
        """clock() -> epoch seconds or None before NTP; actuators: action -> fn(command);
        storage: load() -> ids, save(ids) (None: RAM only); publish(ack) sends one ack;
        reset() restarts the board (None: REBOOT is an unknown action)."""
        self.node_id = node_id
        self.boot = boot
        self.seq = 0
        self.clock = clock
        self.actuators = actuators
        self.storage = storage
        self.publish = publish
        self.reset = reset
        self.reset_due = False
        self.seen = storage.load() if storage is not None else []  # oldest first

    def topic(self, channel):
        return f"devices/{self.node_id}/{channel}"

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

    def will(self, reason="lwt"):
        return json.dumps({"status": "offline", "reason": reason})

    def handle(self, raw):
        """Act on one command payload. Each ack is published as soon as it is due (received
        before the action runs); the acks are also returned, in order."""
        acks = []
        try:
            command = json.loads(raw)
            message_id = command["message_id"]
            action = command["action"]
        except (ValueError, KeyError, TypeError, IndexError):
            return acks  # an empty retained clear, or garbage: nothing to ack
        if message_id in self.seen:
            return self._ack(acks, message_id, "duplicate", "already handled")
        expires_at = command.get("expires_at")
        if expires_at is not None:
            now = self.clock()
            if not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool):
                self._remember(message_id)
                return self._ack(acks, message_id, "rejected", "expires_at is not a number")
            if now is None:
                # past expires_at or not, the node cannot tell: it never runs such a command
                self._remember(message_id)
                return self._ack(acks, message_id, "rejected", "clock not set (no NTP yet)")
            if now > expires_at:
                self._remember(message_id)
                return self._ack(acks, message_id, "expired", "past expires_at")
        if action == "REBOOT" and self.reset is not None:
            return self._reboot(acks, message_id)
        handler = self.actuators.get(action)
        if handler is None:
            self._remember(message_id)
            return self._ack(acks, message_id, "rejected", "unknown action " + str(action))
        self._ack(acks, message_id, "received", "")
        try:
            handler(command)
        except Exception as exc:  # a failing actuator is reported, never fatal
            self._remember(message_id)
            return self._ack(acks, message_id, "failed", str(exc))
        self._remember(message_id)
        return self._ack(acks, message_id, "executed", "")

    def run_pending(self):
        """Called by the main loop after check_msg() returns, so that the PUBACK of a REBOOT
        has been sent; the reset itself happens here, never inside the MQTT callback."""
        if self.reset_due:
            self.reset_due = False
            self.reset()

    def _reboot(self, acks, message_id):
        # the id is in flash before the reset: a redelivery after the boot is a duplicate
        self._ack(acks, message_id, "received", "")
        if not self._remember(message_id):
            return self._ack(acks, message_id, "failed", "cannot store message_id: not rebooting")
        self.reset_due = True
        return self._ack(acks, message_id, "executed", "rebooting")

    def _remember(self, message_id):
        """Add the id to the list (in flash when there is storage); False if not stored."""
        self.seen.append(message_id)
        if len(self.seen) > SEEN_IDS:
            self.seen.pop(0)
        if self.storage is None:
            return True
        try:
            self.storage.save(self.seen)
        except OSError:  # flash full or worn: the id is still remembered until the reset
            return False
        return True

    def _ack(self, acks, message_id, status, detail):
        ack = json.dumps({"message_id": message_id, "status": status, "detail": detail})
        acks.append(ack)
        if self.publish is not None:
            self.publish(ack)
        return acks
