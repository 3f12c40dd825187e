"""The on-device agent: takes the shadow's delta as the update command, downloads through the
device download protocol, verifies, installs into the inactive A/B slot, boots it, commits or
rolls back, and reports the truth in `reported.firmware`. See docs/device-agent.md."""
