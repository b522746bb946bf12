"""Cabinet secrets: generated once, shown once, stored only as hashes."""

import base64
import hashlib
import secrets

# mosquitto_passwd's own parameters (Mosquitto 2.0): PBKDF2-SHA512, 101 rounds, 12-byte salt.
_MOSQUITTO_ITERATIONS = 101
_MOSQUITTO_SALT_BYTES = 12


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """The `$7$` hash line Mosquitto's password file expects."""
    salt = salt if salt is not None else secrets.token_bytes(_MOSQUITTO_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _MOSQUITTO_ITERATIONS)
    return (
        f"$7${_MOSQUITTO_ITERATIONS}$"
        f"{base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    )


def token_hash(token: str) -> str:
    """Tokens are 256 random bits, so a plain SHA-256 is safe and lets us look them up."""
    return hashlib.sha256(token.encode()).hexdigest()
