"""rnr-gateway: the RNR IoT Platform's communication layer."""

__version__ = "0.1.0"
