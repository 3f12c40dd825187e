"""`python -m device_agent --config FILE`: run the agent; "reboot" by re-executing itself.

`OTA_AGENT_CRASH_AT=<step>` (tests only) makes the process SIGKILL itself at that step of an
update: accepted, downloading (the first chunk of the body written, more to come), downloaded,
verified, installing (the image moved into the slot's staging directory, its slot.json not yet
written), installed, marked, switched, booted, checked, decided, reverted. The power-loss tests
use it to cut the power at every step; unset, the hook is `no_crash`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from device_agent.agent import Agent
from device_agent.config import load_config
from device_agent.errors import ConfigError
from device_agent.installer import CrashPoint, no_crash


def crash_hook(step_to_die_at: str | None) -> CrashPoint:
    if not step_to_die_at:
        return no_crash

    def crash(step: str) -> None:
        if step == step_to_die_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return crash


async def serve(agent: Agent) -> bool:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    return await agent.run()


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(prog="python -m device_agent")
    args.add_argument("--config", required=True, type=Path)
    parsed = args.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("OTA_AGENT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(parsed.config)
    except ConfigError as exc:
        print(f"device_agent: {exc}", file=sys.stderr)
        return 2
    crash = crash_hook(os.environ.get("OTA_AGENT_CRASH_AT"))
    agent = Agent(config, crash=crash)
    if asyncio.run(serve(agent)):
        logging.getLogger("device_agent").info("rebooting into the new slot")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "device_agent", *sys.argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
