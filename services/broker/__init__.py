"""MQTT brokers: per-device accounts and ACLs for Mosquitto (dynamic security) and amqtt."""
