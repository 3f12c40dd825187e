"""Every error the rollout service raises on purpose.

Each carries an HTTP-like `code`; the gRPC status for each will live in one table in the
servicer (400 -> INVALID_ARGUMENT, 409 -> FAILED_PRECONDITION).
"""


class RolloutError(Exception):
    """Root of the rollout service's expected failures."""

    code = 500


class InvalidRolloutError(RolloutError):
    """A rollout definition breaks a rule (stage sizes, thresholds, rate, timeouts, ...)."""

    code = 400


class InvalidTargetsError(RolloutError):
    """The resolved target list is malformed (a bad or repeated device id)."""

    code = 400


class InvalidReportError(RolloutError):
    """A device's `reported.firmware` block is malformed or out of bounds."""

    code = 400


class InvalidStateError(RolloutError):
    """An operator command that the rollout's current status does not allow."""

    code = 409
