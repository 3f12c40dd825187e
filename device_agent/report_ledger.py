"""Whether the shadow holds the agent's latest report (pure; ADR 44).

A report is a QoS 1 publish: the broker's PUBACK says the broker has it, not that the shadow
does. Two ways it can be missing although the device is connected: the message is lost after
the broker took it (a gateway's persistent session that never comes back holds its share; amqtt
drops what it had not forwarded when the publisher disconnects), or an *older* report of the
same device commits after it (several gateways split one device's messages between them, and
their batches commit in any order). Either way the shadow would show a state the device left.

The agent tags every report with a clientToken, which the gateway echoes on
`<id>/state/update/accepted` together with the shadow version the update was written at. The
ledger follows the latest report only (reports are whole: the latest holds the truth):

- it is *answered* when its own accepted or rejected arrives;
- it is *overwritten* when another update that wrote `reported.firmware` (an older report of
  this device, a previous process's, anyone's) was accepted at a higher version than it;
- it is *overdue* when nothing answered it within the wait, which doubles on each overdue
  re-send (up to a cap) and starts again at the first answer.

The agent sends what it runs again when a report is overwritten or overdue.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_WAIT_FACTOR = 32  # an unanswered report waits at most 32x the configured wait


@dataclass(slots=True)
class ReportLedger:
    wait_seconds: float  # how long a report may go unanswered before it is sent again
    token: str | None = None  # the latest report's clientToken
    sent_at: float = 0.0
    answered: bool = True
    accepted_version: int | None = None  # the version the latest report was written at
    overwritten_at: int = -1  # the highest version another firmware report was written at
    overdue_sends: int = 0  # re-sends in a row because nothing answered

    def sent(self, token: str, now: float) -> None:
        """The latest report went out with `token`."""
        self.token = token
        self.sent_at = now
        self.answered = False
        self.accepted_version = None
        self.overwritten_at = -1

    def on_accepted(self, token: object, version: object, wrote_firmware: bool) -> bool:
        """An `update/accepted` arrived; True when the latest report is overwritten (send the
        truth again)."""
        if not isinstance(version, int) or isinstance(version, bool):
            return False
        if token is not None and token == self.token:
            self.answered = True
            self.overdue_sends = 0
            self.accepted_version = version
        elif wrote_firmware:
            self.overwritten_at = max(self.overwritten_at, version)
        return self.accepted_version is not None and self.overwritten_at > self.accepted_version

    def on_rejected(self, token: object) -> None:
        """An `update/rejected` arrived: an answer, if it is the latest report's (a rejection
        worth retrying is the agent's to re-send, at once)."""
        if token is not None and token == self.token:
            self.answered = True
            self.overdue_sends = 0

    def current_wait(self) -> float:
        factor: int = min(2**self.overdue_sends, MAX_WAIT_FACTOR)
        return self.wait_seconds * factor

    def due_in(self, now: float) -> float | None:
        """Seconds until the latest report is overdue (0: it is now), None when answered."""
        if self.answered:
            return None
        return max(0.0, self.sent_at + self.current_wait() - now)

    def resending_overdue(self) -> None:
        """The agent is sending the truth again because the latest report went unanswered."""
        self.overdue_sends += 1
