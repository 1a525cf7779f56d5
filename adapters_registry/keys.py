"""Tenant API keys: random secrets shown once, stored only as sha256 digests.

A fast hash is right here: keys carry 256 bits of randomness, so there is nothing
for a slow password hash to protect, and lookups stay one indexed equality.
"""

from __future__ import annotations

import secrets

from adapters_registry.errors import AuthenticationError
from adapters_registry.hashing import sha256_bytes

PREFIX = "lgw-"
SHOWN_PREFIX = 10  # characters kept in clear to name a key in listings and revocation
_TOKEN_CHARS = 43  # token_urlsafe(32)


def new_api_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return sha256_bytes(key.encode())


def invalid_key() -> AuthenticationError:
    # One message for every failure, so a caller learns nothing about which part was wrong.
    return AuthenticationError("invalid API key")


def check_format(key: str) -> str:
    if not key.startswith(PREFIX) or len(key) != len(PREFIX) + _TOKEN_CHARS:
        raise invalid_key()
    return key
