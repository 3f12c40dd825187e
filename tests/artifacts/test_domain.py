"""The pure artifact and download rules: validation, manifests, cursors, targeting, credentials,
token and URL verdicts at a given `now`, Range parsing and the token bucket; with hypothesis
where a rule has a property rather than a table."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent import domain as agent_domain
from services.artifacts import domain
from services.artifacts.domain import (
    ArtifactSpec,
    ByteRange,
    Cursor,
    TokenBucket,
    TokenRecord,
    UploadMeter,
    UrlRecord,
)
from services.artifacts.errors import (
    ArtifactTooLargeError,
    BadRequestError,
    ContentMismatchError,
    InvalidArtifactError,
    RangeNotSatisfiableError,
    TokenExpiredError,
    TokenNotFoundError,
    TokenUsedError,
    UnauthenticatedError,
    UrlExpiredError,
    UrlNotFoundError,
    UrlUsedError,
    WrongDeviceError,
)

ID = "0123456789abcdef0123456789abcdef"


def spec(**overrides: Any) -> ArtifactSpec:
    fields: dict[str, Any] = {"name": "fw", "version": "1.0.0", "compatible": ("gw",)}
    fields.update(overrides)
    return ArtifactSpec(**fields)


# --- metadata -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version",
    ["0.0.0", "1.2.3", "10.20.30", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-0.3.7",
     "1.0.0-x.7.z.92", "1.0.0+20130313144700", "1.0.0-beta+exp.sha.5114f85", "1.0.0-x-y-z.--"],
)  # fmt: skip
def test_semver_versions_are_accepted(version: str) -> None:
    assert spec(version=version).version == version


@pytest.mark.parametrize(
    "version",
    ["1", "1.2", "1.2.3.4", "01.1.1", "1.01.1", "1.1.01", "1.2.3-0123", "1.2.3-", "+invalid",
     "1.2.3+", "-1.0.0", "1.0.0-alpha..1", " 1.0.0", "1.0.0\n", "v1.0.0", "1.0.0-" + "a" * 130],
)  # fmt: skip
def test_non_semver_versions_are_refused(version: str) -> None:
    with pytest.raises(InvalidArtifactError):
        spec(version=version)


@pytest.mark.parametrize(
    "name", ["..", "../x", "x/..", "a/b", "a\\b", "a..b", ".x", "-x", "_x", "", "x" * 129, "x y"]
)
def test_path_like_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArtifactError):
        spec(name=name)


def test_declared_sha256_is_normalized_and_size_must_be_positive() -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    assert spec(sha256=digest.upper()).sha256 == digest
    with pytest.raises(InvalidArtifactError):
        spec(size=0)


@given(st.binary(max_size=4096), st.lists(st.integers(1, 700), max_size=10))
def test_the_meter_agrees_with_hashlib_however_the_bytes_are_chunked(
    data: bytes, cuts: list[int]
) -> None:
    meter = UploadMeter(spec(size=len(data) or None), max_bytes=10_000)
    position = 0
    for cut in [*cuts, len(data)]:
        meter.add(data[position : position + cut])
        position += cut
    if not data:
        with pytest.raises(InvalidArtifactError):
            meter.finish()
        return
    assert meter.finish() == domain.Digest(len(data), hashlib.sha256(data).hexdigest())


def test_the_meter_refuses_as_soon_as_a_limit_is_passed() -> None:
    meter = UploadMeter(spec(), max_bytes=10)
    meter.add(b"x" * 10)
    with pytest.raises(ArtifactTooLargeError):
        meter.add(b"x")
    with pytest.raises(ArtifactTooLargeError):
        UploadMeter(spec(size=11), max_bytes=10)
    longer = UploadMeter(spec(size=3), max_bytes=10)
    with pytest.raises(ContentMismatchError):
        longer.add(b"abcd")
    wrong = UploadMeter(spec(sha256="0" * 64), max_bytes=10)
    wrong.add(b"abc")
    with pytest.raises(ContentMismatchError):
        wrong.finish()


# --- manifests and cursors ----------------------------------------------------------------------


@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(), st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3)),
        max_size=6,
    )
)
def test_canonical_json_is_independent_of_key_order(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert domain.canonical_json(value) == domain.canonical_json(reordered)
    assert json.loads(domain.canonical_json(value)) == value
    assert domain.canonical_json(value).isascii()


def test_the_manifest_is_exactly_the_documented_bytes() -> None:
    manifest = domain.build_manifest(
        ID, spec(compatible=("gw-100", "gw-200")), domain.Digest(5, "a" * 64)
    )
    assert manifest.canonical() == (
        b'{"artifact_id":"0123456789abcdef0123456789abcdef","compatible":["gw-100","gw-200"],'
        b'"name":"fw","sha256":"' + b"a" * 64 + b'","size":5,"version":"1.0.0"}'
    )


def test_a_declared_rollback_floor_is_signed_and_an_undeclared_one_changes_nothing() -> None:
    digest = domain.Digest(5, "a" * 64)
    plain = domain.build_manifest(ID, spec(version="1.2.0"), digest)
    assert plain.rollback_floor is None and b"rollback_floor" not in plain.canonical()
    floored = domain.build_manifest(ID, spec(version="1.2.0", rollback_floor="1.1.0"), digest)
    assert floored.canonical() == (
        b'{"artifact_id":"0123456789abcdef0123456789abcdef","compatible":["gw"],"name":"fw",'
        b'"rollback_floor":"1.1.0","sha256":"' + b"a" * 64 + b'","size":5,"version":"1.2.0"}'
    )


@pytest.mark.parametrize(
    ("version", "floor"),
    [("1.2.0", "1.2.0"), ("1.2.0", "0.0.0"), ("2.0.0", "2.0.0-rc.1"), ("1.2.0+b7", "1.2.0")],
)
def test_a_rollback_floor_up_to_the_version_is_accepted(version: str, floor: str) -> None:
    assert spec(version=version, rollback_floor=floor).rollback_floor == floor


@pytest.mark.parametrize(
    ("version", "floor"),
    [("1.2.0", "1.2.1"), ("1.2.0-rc.1", "1.2.0"), ("1.2.0", "1.2"), ("1.2.0", ""),
     ("1.2.0", "v1.0.0"), ("1.2.0", "1.0.0-" + "a" * 130)],
)  # fmt: skip
def test_a_rollback_floor_above_the_version_or_not_semver_is_refused(
    version: str, floor: str
) -> None:
    with pytest.raises(InvalidArtifactError, match="rollback_floor"):
        spec(version=version, rollback_floor=floor)


@given(
    st.from_regex(domain.SEMVER_PATTERN, fullmatch=True),
    st.from_regex(domain.SEMVER_PATTERN, fullmatch=True),
)
def test_versions_are_ordered_as_the_device_agent_orders_them(a: str, b: str) -> None:
    if len(a) > domain.MAX_VERSION_CHARS or len(b) > domain.MAX_VERSION_CHARS:
        return
    ours = domain.version_key(a) <= domain.version_key(b)
    assert ours == (agent_domain.version_key(a) <= agent_domain.version_key(b))


@given(st.integers(0, 2**62), st.from_regex(domain.ARTIFACT_ID_PATTERN, fullmatch=True))
def test_cursors_round_trip(created: int, artifact_id: str) -> None:
    cursor = Cursor(created, artifact_id)
    assert domain.decode_cursor(cursor.encode()) == cursor


FOREIGN_CURSORS = [
    "x",
    "!!!",
    base64.urlsafe_b64encode(b"1:XYZ").decode(),
    base64.urlsafe_b64encode(b"-1:" + ID.encode()).decode(),
]


@pytest.mark.parametrize("token", FOREIGN_CURSORS)
def test_foreign_cursors_are_refused(token: str) -> None:
    with pytest.raises(InvalidArtifactError):
        domain.decode_cursor(token)


# --- targeting and credentials ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("desired", "expected"),
    [
        ({"firmware": {"url": f"http://h:8080/v1/artifacts/{ID}"}}, ID),
        ({"firmware": {"url": f"https://cdn/x/v1/artifacts/{ID}?ignored=1"}}, ID),
        ({"firmware": {"url": f"/v1/artifacts/{ID}"}}, ID),
        ({"firmware": {"url": f"http://h/v1/artifacts/{ID}/token"}}, None),
        ({"firmware": {"url": f"http://h/v2/things/{ID}"}}, None),
        ({"firmware": {"url": f"http://h/v1/artifacts/{ID.upper()}"}}, None),
        ({"firmware": {"url": 5}}, None),
        ({"firmware": {"version": "1.0.0"}}, None),
        ({"firmware": "x"}, None),
        ({}, None),
        (None, None),
        ([], None),
    ],
)
def test_targeted_artifact(desired: Any, expected: str | None) -> None:
    assert domain.targeted_artifact(desired) == expected


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


def test_basic_credentials() -> None:
    parsed = domain.parse_basic_auth(basic("dev-1:s3cret"))
    assert (parsed.device_id, parsed.password) == ("dev-1", "s3cret")
    assert "s3cret" not in repr(parsed)
    # Device ids may hold colons; the passwords the service issues never do.
    parsed = domain.parse_basic_auth(basic("site-4:gw:7:s3cret"))
    assert (parsed.device_id, parsed.password) == ("site-4:gw:7", "s3cret")
    for header in [None, "", "Bearer x", "Basic", "Basic !!", basic("dev-1"), basic("dev-1:"),
                   basic("a/b:pw"), basic(":pw"), "Basic " + "A" * 2000]:  # fmt: skip
        with pytest.raises(UnauthenticatedError):
            domain.parse_basic_auth(header)


# --- tokens and URLs ----------------------------------------------------------------------------


def test_token_verdicts() -> None:
    token = TokenRecord("dev-1", ID, expires_at=100.0)
    assert domain.check_token(token, "dev-1", 99.9) == token
    with pytest.raises(TokenNotFoundError):
        domain.check_token(None, "dev-1", 0)
    with pytest.raises(WrongDeviceError):
        domain.check_token(token, "dev-2", 0)
    with pytest.raises(TokenExpiredError):
        domain.check_token(token, "dev-1", 100.0)
    with pytest.raises(TokenUsedError):
        domain.check_token(TokenRecord("dev-1", ID, 100.0, used=True), "dev-1", 0)
    # Another device learns nothing about a token's state.
    with pytest.raises(WrongDeviceError):
        domain.check_token(TokenRecord("dev-1", ID, 1.0, used=True), "dev-2", 50)


def test_url_verdicts() -> None:
    url = UrlRecord("dev-1", ID, expires_at=600.0)
    assert domain.check_url(url, "dev-1", 599) == url
    with pytest.raises(UrlNotFoundError):
        domain.check_url(None, "dev-1", 0)
    with pytest.raises(WrongDeviceError):
        domain.check_url(url, "dev-2", 0)
    with pytest.raises(UrlExpiredError):
        domain.check_url(url, "dev-1", 600)
    with pytest.raises(UrlUsedError):
        domain.check_url(UrlRecord("dev-1", ID, 600.0, completed=True), "dev-1", 0)


def test_secret_digests_do_not_contain_the_secret() -> None:
    assert domain.secret_digest("abc") == hashlib.sha256(b"abc").hexdigest()


# --- ranges -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("bytes=0-0", ByteRange(0, 0)),
        ("bytes=0-", ByteRange(0, 99)),
        ("bytes=10-19", ByteRange(10, 19)),
        ("bytes=90-500", ByteRange(90, 99)),
        ("bytes=-10", ByteRange(90, 99)),
        ("bytes=-500", ByteRange(0, 99)),
        ("Bytes = 5-6", ByteRange(5, 6)),
    ],
)
def test_ranges(header: str | None, expected: ByteRange | None) -> None:
    assert domain.parse_range(header, 100) == expected


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ("bytes=100-", RangeNotSatisfiableError),
        ("bytes=100-200", RangeNotSatisfiableError),
        ("bytes=-0", RangeNotSatisfiableError),
        ("bytes=5-4", BadRequestError),
        ("bytes=0-1,3-4", BadRequestError),
        ("bytes=-", BadRequestError),
        ("bytes=a-b", BadRequestError),
        ("bytes 0-1", BadRequestError),
        ("lines=0-1", BadRequestError),
        ("bytes=" + "9" * 20 + "-", BadRequestError),
    ],
)
def test_bad_ranges(header: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        domain.parse_range(header, 100)


def test_if_range() -> None:
    assert domain.parse_range("bytes=5-", 100, '"abc"', '"abc"') == ByteRange(5, 99)
    assert domain.parse_range("bytes=5-", 100, '"old"', '"abc"') is None


@given(st.integers(1, 10_000), st.integers(0, 20_000), st.one_of(st.none(), st.integers(0, 20_000)))
def test_a_satisfiable_range_stays_inside_the_artifact(
    size: int, start: int, end: int | None
) -> None:
    header = f"bytes={start}-{'' if end is None else end}"
    try:
        selected = domain.parse_range(header, size)
    except RangeNotSatisfiableError:
        assert start >= size
        return
    except BadRequestError:
        assert end is not None and end < start
        return
    assert selected is not None
    assert 0 <= selected.start <= selected.end < size
    assert selected.start == start
    assert selected.reaches_end(size) == (end is None or end >= size - 1)


# --- the token bucket ---------------------------------------------------------------------------


@given(st.lists(st.integers(1, 100_000), min_size=1, max_size=50), st.integers(1_000, 10**6))
def test_the_bucket_holds_senders_to_the_rate(amounts: list[int], rate: int) -> None:
    """A sender that waits whatever `reserve` says, on a clock that only its waits move, ends
    after exactly (total - burst) / rate seconds: never faster than the rate."""
    burst = rate // 10 + 1
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    for amount in amounts:
        now += bucket.reserve(amount, now)
    assert now == pytest.approx(max(0.0, (sum(amounts) - burst) / rate), abs=1e-6)


def test_the_bucket_refills_only_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=100, burst=50, now=0.0)
    assert bucket.reserve(50, 0.0) == 0.0
    assert bucket.reserve(100, 1000.0) == pytest.approx(0.5)  # idle time banked only 50
