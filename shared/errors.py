"""Errors of the shared protocol layer, split by cause.

    PrunefleetError
    ├── ProtocolError            a message that does not validate (bad remote data)
    │   └── TopicError           a topic or topic part that is not allowed
    ├── IntegrityError           bytes that do not match their declared hash or size
    │   ├── ChunkHashError
    │   └── ArtifactSizeError
    ├── TrustError               a manifest that must not be acted on
    │   ├── SignatureError       bad signature or unknown key
    │   ├── ExpiredError         manifest past its expiry (freeze attack)
    │   ├── RollbackError        version not higher than the last accepted one
    │   └── MixAndMatchError     an artifact that the current manifest does not name
    └── ConfigError              a bad configuration value
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
    pass


class ArtifactSizeError(IntegrityError):
    pass


class TrustError(PrunefleetError):
    """A manifest that must not be acted on."""


class SignatureError(TrustError):
    pass


class ExpiredError(TrustError):
    pass


class RollbackError(TrustError):
    pass


class MixAndMatchError(TrustError):
    pass


class ConfigError(PrunefleetError):
    pass
