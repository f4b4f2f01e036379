# Copy to config.py on the board and fill in.
WIFI_SSID = "my-network"
WIFI_PASSWORD = ""
MQTT_HOST = "192.168.1.10"  # the edge box running RabbitMQ's MQTT plugin
MQTT_PORT = 1883
MQTT_USERNAME = "rnr_node"
MQTT_PASSWORD = ""
NODE_ID = None  # None: the MAC in upper case without colons
INTERVAL_S = 5
RELAY_PINS = {3: 26, 4: 27}


def read_sensors():
    import esp32

    return {"temperature": round((esp32.raw_temperature() - 32) / 1.8, 1)}
