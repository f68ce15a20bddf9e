"""Human ids (`pool-...`, `ws-...`, `agent-...`) and secret tokens."""

from __future__ import annotations

import hashlib
import re
import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits


def random_id(prefix: str, length: int = 16) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


POOL_ID_RE = re.compile(r"^pool-[a-z0-9]{16}$")
WORKSPACE_ID_RE = re.compile(r"^ws-[a-z0-9]{6,32}$")


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def secret_hex(nbytes: int = 32) -> str:
    return secrets.token_hex(nbytes)
