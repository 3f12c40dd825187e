"""The signing key's life (generated once, 0600, reloaded, never overwritten) and the settings
read from the environment."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from services.artifacts import signing
from services.artifacts.settings import ArtifactSettings
from services.common.config import ConfigError


def test_a_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    first = signing.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = signing.load_or_create(path)
    assert again.key_id == first.key_id
    assert [p.name for p in path.parent.iterdir()] == ["signing.pem"]  # no temp file left
    signature = first.sign(b"manifest")
    assert signing.verify(again.public_key_raw, b"manifest", signature)
    assert not signing.verify(again.public_key_raw, b"manifest!", signature)
    assert not signing.verify(b"short", b"manifest", signature)


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    ids: list[str] = []
    start = threading.Barrier(8)

    def load() -> None:
        start.wait()
        ids.append(signing.load_or_create(path).key_id)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["signing.pem"]


def test_a_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519"):
        signing.load_or_create(path)


def test_settings_from_the_environment() -> None:
    assert ArtifactSettings.from_env({}) == ArtifactSettings()
    settings = ArtifactSettings.from_env(
        {
            "OTA_ARTIFACTS_STORAGE": "S3",
            "OTA_S3_BUCKET": "fleet",
            "OTA_S3_PART_BYTES": str(16 * 1024 * 1024),
            "OTA_DOWNLOAD_URL_TTL_SECONDS": "300",
            "OTA_DOWNLOAD_MAX_CONCURRENT": "32",
            "OTA_DOWNLOAD_MAX_BYTES_PER_SECOND": "1048576",
            "OTA_ARTIFACTS_MAX_BYTES": "1000",
            "OTA_DOWNLOAD_AUTH_CACHE_SECONDS": "0",
        }
    )
    assert settings.auth_cache_seconds == 0
    assert (settings.storage, settings.s3_bucket, settings.url_ttl_seconds) == ("s3", "fleet", 300)
    assert (settings.max_concurrent_downloads, settings.max_bytes_per_second) == (32, 1048576)
    assert settings.max_bytes == 1000


@pytest.mark.parametrize(
    "env",
    [
        {"OTA_ARTIFACTS_STORAGE": "ftp"},
        {"OTA_ARTIFACTS_STORAGE": "s3"},  # no bucket
        {"OTA_S3_PART_BYTES": "1024"},  # under S3's 5 MiB minimum
        {"OTA_DOWNLOAD_URL_TTL_SECONDS": "0"},
        {"OTA_DOWNLOAD_MAX_CONCURRENT": "many"},
    ],
)
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        ArtifactSettings.from_env(env)
