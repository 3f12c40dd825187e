"""Every error the agent raises on purpose, under one root.

`UpdateError` and its children end an update: their message becomes the `error` text of the
reported `failed` (or `rolled_back`) state, so each one says plainly what was wrong.
"""


class AgentError(Exception):
    """Root of the agent's expected failures."""


class ConfigError(AgentError):
    """The configuration file is missing a field or has a bad value."""


class UpdateError(AgentError):
    """An update cannot go on; the running slot is untouched."""


class BadCommandError(UpdateError):
    """The desired `firmware` block is malformed, or names a URL the agent will not use."""


class DownloadError(UpdateError):
    """The download failed for good (refused, gone, too large, or retries exhausted)."""


class RetryableDownloadError(AgentError):
    """A download step failed in a way worth retrying (after backoff)."""

    def __init__(self, message: str, restart_grant: bool = False, retry_after: float = 0.0):
        super().__init__(message)
        self.restart_grant = restart_grant
        self.retry_after = retry_after


class VerificationError(UpdateError):
    """The artifact failed a check: signature, manifest, size, sha256, hardware, floor."""


class InstallError(UpdateError):
    """The installer could not write or switch the slot."""


class HealthCheckError(UpdateError):
    """The new slot booted but failed its health check."""
