"""Device MQTT credentials: a random password issued once, stored only as a salted hash.

The hash is PBKDF2-SHA512 in Mosquitto's `$7$` password-file format, so the same stored value
can feed the broker's authentication as well as our own checks. Passwords are 256-bit random
tokens, so the iteration count guards nothing that entropy does not already guard.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ITERATIONS = 101  # Mosquitto's default for $7$
SALT_BYTES = 12


def new_password() -> str:
    return secrets.token_urlsafe(32)


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a `$7$` hash; False for any malformed hash."""
    try:
        _, kind, iterations, salt_b64, digest_b64 = stored.split("$")
        if kind != "7":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(digest_b64, validate=True)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(digest, expected)
