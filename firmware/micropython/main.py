# rnr node firmware for MicroPython on ESP32 (enhanced format, PROTOCOL §3-4).
# Copy config.py (from config.example.py), rnr_node.py and main.py to the board.
import time

import config
import machine
import network
import ntptime
from rnr_node import Node, SeenStore, ntp_interval_s
from umqtt.simple import MQTTClient

SEEN_FILE = "seen.json"  # message ids already handled, kept across resets
# time.time() counts from 2000 on most ports, from 1970 on some: report Unix time
EPOCH_OFFSET_S = 946684800 if time.gmtime(0)[0] == 2000 else 0


def boot_number():
    try:
        with open("boot.count") as f:
            n = int(f.read()) + 1
    except (OSError, ValueError):
        n = 1
    with open("boot.count", "w") as f:
        f.write(str(n))
    return n


def wifi(sta):
    sta.active(True)
    if not sta.isconnected():
        sta.connect(config.WIFI_SSID, config.WIFI_PASSWORD)
        for _ in range(40):
            if sta.isconnected():
                break
            time.sleep_ms(250)


class Clock:
    """Unix time once NTP has answered; None before (the RTC then keeps it across resyncs)."""

    def __init__(self):
        self.synced = False

    def now(self):
        return time.time() + EPOCH_OFFSET_S if self.synced else None

    def sync(self):
        try:
            ntptime.settime()  # one UDP exchange, bounded by ntptime.timeout (1 s)
        except (OSError, ValueError):
            return False  # readings go without ts, commands with expires_at are refused
        self.synced = True
        return True


relay = {n: machine.Pin(pin, machine.Pin.OUT) for n, pin in config.RELAY_PINS.items()}


def relay_control(command):
    number = command["relay"]
    if number not in relay:
        raise ValueError(f"no relay {number}")
    relay[number].value(1 if command["state"] else 0)


# REBOOT is handled by Node itself (ack first, reset after the callback has returned)
ACTUATORS = {
    "RELAY_CONTROL": relay_control,
    "STATUS_REQUEST": lambda command: None,
    "PING": lambda command: None,
    "SET_INTERVAL": lambda command: setattr(config, "INTERVAL_S", int(command["seconds"])),
}


def restart(client, node):
    # a QoS 1 publish returns once the broker has answered it, so the PUBACK of the REBOOT
    # written before it on the same connection has reached the broker too
    try:
        client.publish(node.topic("status"), node.will("reboot"), retain=True, qos=1)
        client.disconnect()
    except OSError:
        pass  # not delivered: the id is in flash, a redelivery is acked duplicate
    machine.reset()


def serve(node, clock, sta, link):
    wifi(sta)
    if not clock.synced:
        clock.sync()
    client = MQTTClient(
        node.node_id,
        config.MQTT_HOST,
        port=config.MQTT_PORT,
        user=config.MQTT_USERNAME,
        password=config.MQTT_PASSWORD,
        keepalive=30,
    )
    link["client"] = client
    client.set_last_will(node.topic("status"), node.will(), retain=True, qos=1)
    client.set_callback(lambda topic, payload: node.handle(payload))
    try:
        client.connect(clean_session=False)
        client.subscribe(node.topic("commands"), qos=1)
        client.subscribe(node.topic("commands/last"), qos=1)
        client.publish(node.topic("status"), node.online(), retain=True, qos=1)
        next_at = time.ticks_ms()
        ntp_at = time.ticks_add(next_at, ntp_interval_s(clock.synced) * 1000)
        while True:
            client.check_msg()  # the PUBACK of a command goes out when its callback returns
            node.run_pending()  # so a REBOOT resets only here
            if time.ticks_diff(time.ticks_ms(), next_at) >= 0:
                client.publish(node.topic("data"), node.message(config.read_sensors()), qos=1)
                next_at = time.ticks_add(next_at, config.INTERVAL_S * 1000)
            if time.ticks_diff(time.ticks_ms(), ntp_at) >= 0:
                clock.sync()
                ntp_at = time.ticks_add(time.ticks_ms(), ntp_interval_s(clock.synced) * 1000)
            time.sleep_ms(20)
    finally:
        if client.sock is not None:  # None when the broker was never reached
            client.sock.close()


def run():
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    mac = "".join(f"{b:02X}" for b in sta.config("mac"))
    clock = Clock()
    link = {}  # the current MQTT client, replaced on each reconnect

    def publish_ack(ack):
        link["client"].publish(node.topic("ack"), ack, qos=1)

    # one Node per boot: boot and seq stay the same across reconnects
    node = Node(
        config.NODE_ID or mac,
        boot_number(),
        clock.now,
        ACTUATORS,
        storage=SeenStore(SEEN_FILE),
        publish=publish_ack,
        reset=lambda: restart(link["client"], node),
    )
    while True:
        try:
            serve(node, clock, sta, link)
        except Exception as exc:  # Wi-Fi or broker gone: start over after a pause
            print("rnr: reconnecting after", repr(exc))
            time.sleep(5)


run()
