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


class RolloutNotFoundError(RolloutError):
    code = 404


class RolloutExistsError(RolloutError):
    code = 409


class TargetConflictError(RolloutError):
    """A target is already in another live rollout."""

    code = 409


class ConcurrentUpdateError(RolloutError):
    """The rollout changed between read and write; re-read and try again."""

    code = 409


class ShadowUnavailableError(RolloutError):
    """The shadow service failed a call (it is down, or refused it)."""

    code = 503
