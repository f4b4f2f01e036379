# rnr node firmware for MicroPython on ESP32 (enhanced format, PROTOCOL §3-4).
# Copy config.py (from config.example.py), rnr_node.py and main.py to the board.
import time

import machine
import network
import ntptime
from umqtt.simple import MQTTClient

import config
from rnr_node import Node


def boot_number():
    try:
        with open("boot.count") as f:
            n = int(f.read()) + 1
    except (OSError, ValueError):
        n = 1
    with open("boot.count", "w") as f:
        f.write(str(n))
    return n


def wifi():
    sta = network.WLAN(network.STA_IF)
    sta.active(True)
    if not sta.isconnected():
        sta.connect(config.WIFI_SSID, config.WIFI_PASSWORD)
        for _ in range(40):
            if sta.isconnected():
                break
            time.sleep_ms(250)
    return sta


def clock():
    # time.time() is seconds since 2000 on MicroPython ports: convert to the Unix epoch
    return time.time() + 946684800 if SYNCED else None


SYNCED = False
relay = {n: machine.Pin(pin, machine.Pin.OUT) for n, pin in config.RELAY_PINS.items()}


def relay_control(command):
    number = command["relay"]
    if number not in relay:
        raise ValueError("no relay %s" % number)
    relay[number].value(1 if command["state"] else 0)


ACTUATORS = {
    "RELAY_CONTROL": relay_control,
    "REBOOT": lambda command: machine.reset(),
    "STATUS_REQUEST": lambda command: None,
    "PING": lambda command: None,
    "SET_INTERVAL": lambda command: setattr(config, "INTERVAL_S", int(command["seconds"])),
}


def main():
    global SYNCED
    sta = wifi()
    try:
        ntptime.settime()
        SYNCED = True
    except OSError:
        SYNCED = False  # readings go without ts; the gateway's clock is the record
    mac = "".join("%02X" % b for b in sta.config("mac"))
    node = Node(config.NODE_ID or mac, boot_number(), clock, ACTUATORS)
    client = MQTTClient(node.node_id, config.MQTT_HOST, port=config.MQTT_PORT,
                        user=config.MQTT_USERNAME, password=config.MQTT_PASSWORD, keepalive=30)
    client.set_last_will(node.topic("status"), node.will(), retain=True, qos=1)

    def on_command(topic, payload):
        for ack in node.handle(payload):
            client.publish(node.topic("ack"), ack, qos=1)

    client.set_callback(on_command)
    client.connect(clean_session=False)
    client.subscribe(node.topic("commands"), qos=1)
    client.subscribe(node.topic("commands/last"), qos=1)
    client.publish(node.topic("status"), node.online(), retain=True, qos=1)
    sensor = config.read_sensors
    next_at = time.ticks_ms()
    while True:
        client.check_msg()
        if time.ticks_diff(time.ticks_ms(), next_at) >= 0:
            client.publish(node.topic("data"), node.message(sensor()), qos=1)
            next_at = time.ticks_add(next_at, config.INTERVAL_S * 1000)
        time.sleep_ms(20)


while True:
    try:
        main()
    except OSError:  # Wi-Fi or broker gone: start over after a pause
        time.sleep(5)
