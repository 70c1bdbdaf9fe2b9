"""The server's Ed25519 signing keys on disk, and their rotation.

Files in the key directory::

    signing.pem            current private key (0600)
    public.pem             its public key: what agents pin
    previous.pem           the key before the last rotation (0600), while it is kept
    previous-public.pem    its public key
    revoked.json           key ids retired so far (every manifest names them)

A rotation (:func:`rotate`) keeps the old key as "previous" and makes a new current one.
While a previous key exists, :class:`KeyRing` signs every manifest with both, so agents
that pin the old key, the new key, or both accept it (``TrustedKeys.verify`` needs one
valid trusted signature). Once every agent pins the new key, :func:`retire_previous`
removes the old one and revokes it: every manifest signed from then on names it in
``revoked_keyids``, and an agent that accepts one never trusts the old key again (a
manifest someone still signs with it alone is refused), even where its configuration still
pins it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import MAX_REVOKED_KEYS, Manifest, SignedManifest
from prunefleet.shared.signing import SigningKey, TrustedKeys

from .errors import KeyringError

SIGNING = "signing.pem"
PUBLIC = "public.pem"
PREVIOUS = "previous.pem"
PREVIOUS_PUBLIC = "previous-public.pem"
REVOKED = "revoked.json"


def load_or_create(directory: Path) -> SigningKey:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    priv = directory / SIGNING
    if priv.exists():
        key = SigningKey.from_pem(priv.read_bytes())
    else:
        key = SigningKey.generate()
        atomic_write(priv, key.to_pem(), mode=0o600)
    pub = directory / PUBLIC
    if not pub.exists() or pub.read_bytes() != key.public_pem():
        atomic_write(pub, key.public_pem())
    return key


@dataclass(frozen=True)
class KeyRing:
    """The key that signs, plus the previous one during a rotation."""

    current: SigningKey
    previous: SigningKey | None = None
    revoked: tuple[str, ...] = ()  # retired key ids, named in every manifest

    @property
    def keyid(self) -> str:
        return self.current.keyid

    @property
    def keyids(self) -> list[str]:
        return [k.keyid for k in self.keys]

    @property
    def keys(self) -> list[SigningKey]:
        return [self.current] if self.previous is None else [self.current, self.previous]

    def trusted(self) -> TrustedKeys:
        """The keys whose version certificates this server believes (not the revoked)."""
        return TrustedKeys([k.public for k in self.keys], self.revoked)

    def sign(self, manifest: Manifest) -> SignedManifest:
        """One payload; per key (current first) its signature and version certificate."""
        signed = [k.sign(manifest) for k in self.keys]
        return SignedManifest(
            payload=signed[0].payload,
            signatures=[s for sm in signed for s in sm.signatures],
        )


def load_keyring(directory: Path) -> KeyRing:
    """The current key (created if missing) and the previous one if it is kept."""
    directory = Path(directory)
    current = load_or_create(directory)
    prev_path = directory / PREVIOUS
    previous = SigningKey.from_pem(prev_path.read_bytes()) if prev_path.exists() else None
    return KeyRing(current, previous, revoked_keyids(directory))


def revoked_keyids(directory: Path) -> tuple[str, ...]:
    """Key ids retired in ``directory``, oldest first (the newest MAX_REVOKED_KEYS)."""
    path = Path(directory) / REVOKED
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return ()
    except ValueError as e:
        raise KeyringError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, list) or not all(isinstance(k, str) and len(k) == 64 for k in raw):
        raise KeyringError(f"{path}: expected a list of key ids")
    return tuple(raw[-MAX_REVOKED_KEYS:])


def rotate(directory: Path) -> KeyRing:
    """Make a new current key; the current one becomes "previous".

    Refused while a previous key is still kept: two rotations in a row would drop a key
    that agents may still pin alone. Retire the previous key first.
    """
    directory = Path(directory)
    if not (directory / SIGNING).exists():
        raise KeyringError(f"no signing key in {directory}: run `prunefleet keys init` first")
    if (directory / PREVIOUS).exists():
        raise KeyringError(
            f"a rotation is already in progress in {directory} (previous.pem exists); "
            "run `prunefleet keys retire` once every agent pins the new key"
        )
    old = SigningKey.from_pem((directory / SIGNING).read_bytes())
    new = SigningKey.generate()
    # previous first: a crash between the two steps leaves the old key in both places,
    # never lost.
    atomic_write(directory / PREVIOUS, old.to_pem(), mode=0o600)
    atomic_write(directory / PREVIOUS_PUBLIC, old.public_pem())
    atomic_write(directory / SIGNING, new.to_pem(), mode=0o600)
    atomic_write(directory / PUBLIC, new.public_pem())
    return KeyRing(new, old)


def retire_previous(directory: Path) -> SigningKey | None:
    """Stop signing with the previous key; returns it, or None when there was none."""
    directory = Path(directory)
    path = directory / PREVIOUS
    if not path.exists():
        return None
    old = SigningKey.from_pem(path.read_bytes())
    revoked = [k for k in revoked_keyids(directory) if k != old.keyid] + [old.keyid]
    # Revoked first: a crash before the unlink leaves a key that signs and is revoked
    # (agents refuse what it alone signs), never one that is gone and still trusted.
    atomic_write(directory / REVOKED, json.dumps(revoked[-MAX_REVOKED_KEYS:]).encode())
    path.unlink()
    (directory / PREVIOUS_PUBLIC).unlink(missing_ok=True)
    return old


def fingerprint(directory: Path) -> tuple[float, ...]:
    """Changes whenever a key file changes (a running server reloads on it)."""
    out = []
    for name in (SIGNING, PREVIOUS, REVOKED):
        try:
            st = (Path(directory) / name).stat()
            out += [st.st_mtime_ns, st.st_ino]
        except FileNotFoundError:
            out += [0, 0]
    return tuple(out)
