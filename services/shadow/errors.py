"""Every error the shadow service raises on purpose.

Each carries the HTTP-like code of the device shadow protocol (the `code` of a `rejected`
message). The gRPC status for each lives in one table in `servicer.py`.
"""


class ShadowError(Exception):
    """Root of the shadow service's expected failures."""

    code = 500


class InvalidRequestError(ShadowError):
    """The request or document is malformed (bad JSON, wrong types, too deep, bad filter)."""

    code = 400


class InvalidDeviceIdError(InvalidRequestError):
    """A device id that is not safe as an MQTT topic level or broker user name."""


class DeviceNotFoundError(ShadowError):
    """No device is registered under that id."""

    code = 404


class ShadowNotFoundError(ShadowError):
    """The device exists but has no shadow (never updated, or deleted)."""

    code = 404


class DeviceExistsError(ShadowError):
    """A device is already registered under that id."""

    code = 409


class VersionConflictError(ShadowError):
    """The request named a version other than the shadow's current one."""

    code = 409

    def __init__(self, message: str, current_version: int) -> None:
        super().__init__(message)
        self.current_version = current_version


class DocumentTooLargeError(ShadowError):
    """The request, or the document it would produce, is over the size limit."""

    code = 413


class RateLimitedError(ShadowError):
    """The device sent more updates than its rate allows."""

    code = 429


class BrokerUnavailableError(ShadowError):
    """The MQTT broker could not create or revoke the device's account; nothing changed."""

    code = 503


class CallerGoneError(ShadowError):
    """The caller's deadline passed before the write could commit: nothing was written
    (ADR 42). A caller that gave up tells its own client "failed", so the write must not land
    later, behind the writes that client sends next."""

    code = 503
