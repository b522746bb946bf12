"""Cabinet secrets: generated once, shown once, stored only as hashes."""

import base64
import hashlib
import hmac
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


def verify_mosquitto_hash(password: str, stored: str) -> bool:
    try:
        _, kind, rounds, salt_b64, digest_b64 = stored.split("$")
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
        iterations = int(rounds)
    except ValueError:
        return False
    if kind != "7":
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(digest, expected)


def token_hash(token: str) -> str:
    """Tokens are 256 random bits, so a plain SHA-256 is safe and lets us look them up."""
    return hashlib.sha256(token.encode()).hexdigest()
