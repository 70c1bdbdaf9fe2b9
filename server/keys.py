"""The server's Ed25519 signing key on disk (``<dir>/signing.pem``, ``<dir>/public.pem``)."""

from __future__ import annotations

import os
from pathlib import Path

from prunefleet.shared.signing import SigningKey


def load_or_create(directory: Path) -> SigningKey:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    priv = directory / "signing.pem"
    if priv.exists():
        key = SigningKey.from_pem(priv.read_bytes())
    else:
        key = SigningKey.generate()
        tmp = directory / ".signing.pem.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_pem())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, priv)
    pub = directory / "public.pem"
    if not pub.exists() or pub.read_bytes() != key.public_pem():
        pub.write_bytes(key.public_pem())
    return key
