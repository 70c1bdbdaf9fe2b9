"""Errors of the shared protocol layer, split by cause.

    PrunefleetError
    ├── ProtocolError            a message that does not validate (bad remote data)
    │   └── TopicError           a topic or topic part that is not allowed
    ├── IntegrityError           bytes that do not match their declared hash or size
    │   ├── ChunkHashError       a chunk whose SHA-256 is not the manifest's
    │   └── ArtifactSizeError    more bytes than declared (endless data, zip bomb)
    ├── TransportError           the broker cannot be reached or refused us; a bad topic
    └── TrustError               a manifest that must not be acted on (or another target's)
        ├── SignatureError       bad signature or unknown key
        ├── ExpiredError         manifest past its expiry (freeze attack)
        └── RollbackError        version not higher than the last accepted one

Mix and match has no class of its own: every variant is named in one signed manifest, so a
stitched manifest fails its signature (SignatureError) and another artifact's bytes fail
their chunk hashes (ChunkHashError).
"""


class PrunefleetError(Exception):
    """Base of every error prunefleet raises on purpose."""


class ProtocolError(PrunefleetError):
    """Remote data that does not parse or validate."""


class TopicError(ProtocolError):
    """A topic, or a value used to build one, that is not allowed."""


class IntegrityError(PrunefleetError):
    """Bytes that do not match the hash or size they were declared with."""


class ChunkHashError(IntegrityError):
    """A chunk whose SHA-256 is not the one the manifest declares for it."""


class ArtifactSizeError(IntegrityError):
    """A chunk (or what it decompresses to) larger than the size the manifest declares."""


class TransportError(PrunefleetError):
    """The broker cannot be reached or refused us, or a topic MQTT does not allow."""


class TrustError(PrunefleetError):
    """A manifest that must not be acted on."""


class SignatureError(TrustError):
    pass


class ExpiredError(TrustError):
    pass


class RollbackError(TrustError):
    pass

