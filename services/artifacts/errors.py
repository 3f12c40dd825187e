"""Every error the artifact service raises on purpose.

Each carries the HTTP status and the short code that the download plane puts in its JSON error
body (`{"error": code, "message": ...}`). The gRPC status for each lives in one table in
`servicer.py`; the download plane uses `http_status` and `code` as they are.
"""


class ArtifactError(Exception):
    """Root of the artifact service's expected failures."""

    http_status = 500
    code = "internal"


# --- artifacts (gRPC) ---------------------------------------------------------------------------


class InvalidArtifactError(ArtifactError):
    """Bad metadata: name, version, hardware list, declared sha256 or size, message order."""

    http_status = 400
    code = "invalid_request"


class ContentMismatchError(ArtifactError):
    """The bytes received are not the bytes declared (sha256 or size differ, upload cut short)."""

    http_status = 400
    code = "content_mismatch"


class ArtifactTooLargeError(ArtifactError):
    """An upload over the configured maximum size."""

    http_status = 413
    code = "too_large"


class ArtifactExistsError(ArtifactError):
    """An artifact with this name and version already exists."""

    http_status = 409
    code = "already_exists"


class ArtifactNotFoundError(ArtifactError):
    """No artifact has that id."""

    http_status = 404
    code = "artifact_not_found"


class ArtifactInUseError(ArtifactError):
    """The artifact cannot be deleted while a rollout uses it."""

    http_status = 409
    code = "in_use"


class StorageError(ArtifactError):
    """The storage backend failed (disk, S3); wraps the backend's own exception."""

    http_status = 503
    code = "storage_unavailable"


# --- the download plane (HTTP) ------------------------------------------------------------------


class BadRequestError(ArtifactError):
    """A malformed HTTP request: body, JSON, header."""

    http_status = 400
    code = "bad_request"


class UnauthenticatedError(ArtifactError):
    """No device credentials, or wrong ones (the two are not told apart)."""

    http_status = 401
    code = "unauthenticated"


class NotTargetedError(ArtifactError):
    """The device's desired state does not name this artifact."""

    http_status = 403
    code = "not_targeted"


class WrongDeviceError(ArtifactError):
    """A token or URL that was issued to another device."""

    http_status = 403
    code = "wrong_device"


class TokenNotFoundError(ArtifactError):
    """A token this service never issued (or purged long ago)."""

    http_status = 404
    code = "token_not_found"


class TokenExpiredError(ArtifactError):
    """A token past its expiry."""

    http_status = 410
    code = "token_expired"


class TokenUsedError(ArtifactError):
    """A token that was already exchanged for a URL (tokens are single-use)."""

    http_status = 410
    code = "token_used"


class UrlNotFoundError(ArtifactError):
    """A download URL this service never issued (or purged long ago)."""

    http_status = 404
    code = "url_not_found"


class UrlExpiredError(ArtifactError):
    """A download URL past its expiry."""

    http_status = 410
    code = "url_expired"


class UrlUsedError(ArtifactError):
    """A download URL whose download has completed."""

    http_status = 410
    code = "url_used"


class RangeNotSatisfiableError(ArtifactError):
    """A Range header that selects no byte of the artifact."""

    http_status = 416
    code = "range_not_satisfiable"

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class TooManyDownloadsError(ArtifactError):
    """The plane already serves its maximum number of concurrent downloads."""

    http_status = 429
    code = "too_many_downloads"


class UpstreamUnavailableError(ArtifactError):
    """The shadow service did not answer, so the device cannot be checked."""

    http_status = 503
    code = "upstream_unavailable"
