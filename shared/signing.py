"""Ed25519 signatures over manifests (TUF-lite).

The server signs the exact JSON text of a :class:`Manifest`; the agent checks the
signature with keys it pins, then parses that same text, so what was verified is exactly
what is acted on. Key ids are the SHA-256 of the raw public key.

Each signing key also signs a **version certificate**: the statement "this key signed
manifest version N", short enough for a device to report with every state
(``ReportedState.version_proof``). It rides in the manifest's ``signatures`` list under
its own id (:func:`certificate_keyid`, derived from the key's), which no agent pins, so an
agent that predates certificates skips it as the signature of an unknown key. The message
it signs (:func:`certificate_message`) carries its own context, so it can never pass for
a manifest's signature, nor one for it. A new or restored store trusts a device's
accepted version only as far as a certificate proves it (``Store.next_manifest_version``).
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import ExpiredError, ProtocolError, RollbackError, SignatureError, TrustError
from .messages import Manifest, Signature, SignedManifest, decode


def keyid_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


CERTIFICATE_CONTEXT = b"prunefleet manifest version certificate v1\n"


def certificate_keyid(keyid: str) -> str:
    """The id a key's version certificates go under: never the id of a key."""
    return hashlib.sha256(CERTIFICATE_CONTEXT + keyid.encode()).hexdigest()


def certificate_message(version: int) -> bytes:
    """What a version certificate signs: its context, then the version in decimal."""
    return CERTIFICATE_CONTEXT + str(int(version)).encode()


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError("signing key is not an Ed25519 private key")
        return cls(key)

    def to_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def keyid(self) -> str:
        return keyid_of(self.public)

    def public_pem(self) -> bytes:
        return self.public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def certify(self, version: int) -> Signature:
        """This key's certificate that it signed manifest ``version``."""
        sig = self.private.sign(certificate_message(version))
        return Signature(keyid=certificate_keyid(self.keyid),
                         sig=base64.b64encode(sig).decode())

    def sign(self, manifest: Manifest) -> SignedManifest:
        """The manifest's signature, then this key's certificate of its version."""
        # Without revocations (profile-only variants) the field is left out, so agents of
        # the previous release (which forbid unknown fields) still accept the manifest; one
        # with profile-only variants they refuse, rather than serve them.
        exclude: dict = {}
        if not manifest.revoked_keyids:
            exclude["revoked_keyids"] = True
        if not manifest.profile_only:
            exclude["variants"] = {"__all__": {"profile_only"}}
        if not manifest.reprofile:  # likewise: no re-profile ever requested
            exclude["reprofile"] = True
        payload = manifest.model_dump_json(by_alias=True, exclude=exclude or None)
        sig = self.private.sign(payload.encode())
        return SignedManifest(
            payload=payload,
            signatures=[Signature(keyid=self.keyid, sig=base64.b64encode(sig).decode()),
                        self.certify(manifest.version)],
        )


def load_public_pem(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as e:
        raise SignatureError(f"not a PEM public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("public key is not Ed25519")
    return key


class TrustedKeys:
    """The public keys an agent pins; more than one during a key rotation.

    ``revoked`` key ids are never trusted, even when pinned: a manifest signed by a current
    key revoked them (``Manifest.revoked_keyids``, after ``prunefleet keys retire``).
    """

    def __init__(self, keys: Iterable[Ed25519PublicKey], revoked: Iterable[str] = ()):
        pinned = {keyid_of(k): k for k in keys}
        if not pinned:
            raise SignatureError("no trusted keys configured")
        self.revoked = frozenset(revoked)
        self._all = pinned
        self._keys = {i: k for i, k in pinned.items() if i not in self.revoked}
        self._certifiers = {certificate_keyid(i): k for i, k in self._keys.items()}

    @property
    def keyids(self) -> frozenset[str]:
        """The pinned keys still trusted (revoked ones left out)."""
        return frozenset(self._keys)

    def without(self, keyids: Iterable[str]) -> TrustedKeys:
        """The same pins with ``keyids`` revoked as well."""
        return TrustedKeys(self._all.values(), self.revoked | frozenset(keyids))

    def certifies(self, version: int, proof: Sequence[Signature]) -> bool:
        """A trusted key's certificate in ``proof`` says it signed manifest ``version``."""
        message = certificate_message(version)
        tried: set[str] = set()
        for s in proof:
            key = self._certifiers.get(s.keyid)
            if key is None or s.keyid in tried:
                continue  # one check per key, however many entries name it
            tried.add(s.keyid)
            try:
                key.verify(base64.b64decode(s.sig, validate=True), message)
            except (InvalidSignature, ValueError):
                continue
            return True
        return False

    def proof_of(self, signed: SignedManifest, version: int) -> tuple[Signature, ...]:
        """The certificates in ``signed`` (a manifest of ``version`` that verified) that a
        trusted key made: what the device reports with that version. Empty for a manifest
        from a server that predates certificates."""
        return tuple(s for s in signed.signatures
                     if s.keyid in self._certifiers and self.certifies(version, [s]))

    def verify(
        self,
        signed: SignedManifest,
        *,
        now: float | None = None,
        min_version: int = 0,
        target: str | None = None,
    ) -> Manifest:
        """Return the manifest if a pinned key signed it, it is unexpired and newer.

        ``min_version`` is the last version accepted: an equal version is allowed (the same
        manifest seen again after a reconnect), a lower one is a rollback. ``target``, when
        given, is the device or group the manifest must be addressed to.
        """
        payload = signed.payload.encode()
        valid: set[str] = set()
        for s in signed.signatures:
            key = self._keys.get(s.keyid)
            if key is None or s.keyid in valid:
                continue
            try:
                key.verify(base64.b64decode(s.sig, validate=True), payload)
            except (InvalidSignature, ValueError):
                continue
            valid.add(s.keyid)
        if not valid:
            known = any(s.keyid in self._keys for s in signed.signatures)
            revoked = any(s.keyid in self.revoked for s in signed.signatures)
            raise SignatureError(
                "manifest signature does not verify" if known
                else "manifest is signed by a revoked key" if revoked
                else "manifest is signed by no trusted key"
            )
        try:
            manifest = decode(Manifest, payload)
        except ProtocolError as e:
            raise SignatureError(f"signed payload is not a valid manifest: {e}") from e
        if not valid - set(manifest.revoked_keyids):
            raise SignatureError("manifest is signed only by keys it revokes")
        now = time.time() if now is None else now
        if manifest.expires_at <= now:
            raise ExpiredError(
                f"manifest version {manifest.version} expired "
                f"{now - manifest.expires_at:.0f} s ago"
            )
        if manifest.version < min_version:
            raise RollbackError(
                f"manifest version {manifest.version} is older than accepted {min_version}"
            )
        if target is not None and manifest.target != target:
            raise TrustError(f"manifest is for {manifest.target!r}, not this device")
        return manifest
