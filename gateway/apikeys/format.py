"""The API key on the wire: ``gk_live_`` or ``gk_test_``, 30 random base62 characters, and a
6-character base62 CRC32 checksum of everything before it (GitHub's token scheme).

The prefix makes keys greppable for secret scanners; the checksum lets the gate refuse a
mistyped or made-up key with no store lookup (:func:`well_formed`: pure, a few microseconds).
The store keeps :func:`key_hash` (SHA-256 of the whole key), never the key; people see
:func:`key_start` (the first 12 characters) and the key's id (:func:`new_key_id`)."""

import hashlib
import hmac
import re
import secrets
import zlib

__all__ = [
    "BASE62",
    "CHECKSUM_LENGTH",
    "KEY_LENGTH",
    "KEY_PATTERN",
    "RANDOM_LENGTH",
    "START_LENGTH",
    "checksum",
    "digest_matches",
    "key_hash",
    "key_start",
    "new_key",
    "new_key_id",
    "prefix_for",
    "well_formed",
]

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_LENGTH = 30  # 30 base62 characters: about 178 bits
CHECKSUM_LENGTH = 6  # 62**6 > 2**32: any CRC32 fits
LIVE_PREFIX, TEST_PREFIX = "gk_live_", "gk_test_"
KEY_LENGTH = len(LIVE_PREFIX) + RANDOM_LENGTH + CHECKSUM_LENGTH
#: What the key shows people (the account page, ``gateway keys list``): prefix + 4.
START_LENGTH = 12
#: A key-shaped token anywhere in a text (a URL's query, a log line in the tests).
KEY_PATTERN = re.compile(r"gk_(?:live|test)_[0-9A-Za-z]{36}")
_SHAPE = re.compile(r"gk_(?:live|test)_[0-9A-Za-z]{36}\Z")


def prefix_for(live: bool) -> str:
    """The key prefix of the gate's mode (a live Stripe key: ``gk_live_``)."""
    return LIVE_PREFIX if live else TEST_PREFIX


def checksum(body: str) -> str:
    """The base62 CRC32 of ``body``, left-padded with ``0`` to 6 characters."""
    n = zlib.crc32(body.encode())
    out = []
    for _ in range(CHECKSUM_LENGTH):
        n, digit = divmod(n, 62)
        out.append(BASE62[digit])
    return "".join(reversed(out))


def new_key(live: bool) -> str:
    """A new random key of the gate's mode."""
    body = prefix_for(live) + "".join(secrets.choice(BASE62) for _ in range(RANDOM_LENGTH))
    return body + checksum(body)


def well_formed(key: str, live: bool) -> bool:
    """Whether ``key`` is a key of this gate's mode with a valid checksum (no I/O): a key of
    the other mode (a test key on a live gate), a wrong length, a character outside base62
    or a checksum that does not match is refused before any store lookup."""
    if len(key) != KEY_LENGTH or not key.startswith(prefix_for(live)) or not _SHAPE.match(key):
        return False
    body = key[:-CHECKSUM_LENGTH]
    return hmac.compare_digest(checksum(body), key[-CHECKSUM_LENGTH:])


def key_hash(key: str) -> str:
    """The store's name for a key: the SHA-256 (hex) of the whole key."""
    return hashlib.sha256(key.encode()).hexdigest()


def digest_matches(key: str, stored_hash: str) -> bool:
    """Whether ``key`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(key_hash(key).encode(), stored_hash.encode())


def key_start(key: str) -> str:
    """The first 12 characters, for display (``gk_live_AbCd``)."""
    return key[:START_LENGTH]


def new_key_id() -> str:
    """A key's public id (in logs, ``X-Gate-Key``, the CLI): ``key_`` + 16 hex."""
    return "key_" + secrets.token_hex(8)
