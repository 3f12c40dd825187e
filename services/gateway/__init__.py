"""The MQTT gateway: the bridge between device topics and the shadow service."""
