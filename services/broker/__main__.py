"""`python -m services.broker`: the embedded amqtt broker as a process of the local stack.

Settings: OTA_EMBEDDED_MQTT_LISTEN (host:port, default 127.0.0.1:1883), OTA_SHADOW_ADDRESS,
OTA_BROKER_ACCOUNTS_FILE (JSON {username: "$7$..." hash} of the service accounts).
"""

import asyncio
import json
import os
import signal
from pathlib import Path

from services.broker.embedded import broker_config, run_broker
from services.common.observability import configure_logging


async def main() -> None:
    # amqtt reports every connection at INFO: WARNING unless OTA_LOG_LEVEL asks for more.
    configure_logging("broker", default_level="WARNING")
    host, _, port = os.environ.get("OTA_EMBEDDED_MQTT_LISTEN", "127.0.0.1:1883").rpartition(":")
    accounts_file = os.environ.get("OTA_BROKER_ACCOUNTS_FILE")
    accounts = json.loads(Path(accounts_file).read_text()) if accounts_file else {}
    shadow = os.environ.get("OTA_SHADOW_ADDRESS", "127.0.0.1:50051")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    token = os.environ.get("OTA_SERVICE_TOKEN", "")
    await run_broker(broker_config(host, int(port), shadow, accounts, token), stop)


asyncio.run(main())
