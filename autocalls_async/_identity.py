"""Names for a token that never reveal it.

* ``limiter_key(token)``: what limiters and stores are given to tell tokens apart, the same on
  every host (a Redis schedule is shared by all of them). A domain-separated SHA-256, shown
  nowhere; each store keeps it under a keyed hash of its own.
* ``token_id(key)``: what logs, ``repr()`` and warnings show. A keyed hash (HMAC) whose random
  key is kept in this user's store in its one place on the host (``canonical_directory()``,
  mode 0600, whatever ``AUTOCALLS_LIMITER_DIR`` says), so a token id cannot be used to check a
  guess of the token (a partial echo of it, say) by anyone who cannot read that store. Every
  process of the user shows the same id for a token; where the store cannot be used, a process
  uses a random key of its own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from ._hoststore import canonical_directory, user_secret

__all__ = ["limiter_key", "token_id"]

_DOMAIN = b"autocalls-async limiter key v1\0"
_SECRETS: dict[str, bytes] = {}


def limiter_key(token: str) -> str:
    """The token's name for limiters: the same on every host and in every process."""
    return hashlib.sha256(_DOMAIN + token.encode()).hexdigest()


def token_id(key: str) -> str:
    """The token's name for people: 16 hex digits of a keyed hash of ``limiter_key``."""
    place = str(canonical_directory())
    secret = _SECRETS.get(place)
    if secret is None:
        secret = _SECRETS[place] = user_secret() or secrets.token_bytes(32)
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:16]
