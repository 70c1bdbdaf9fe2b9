"""Errors of the server, split by cause.

    ServerError
    ├── StoreError          the database refused or is unreachable (from SQLAlchemy's)
    │   └── StoreConflictError  a unique constraint: another writer got there first
    ├── DistributionError   an artifact or manifest cannot be published
    ├── KeyringError        a signing key is missing, or a rotation step is out of order
    ├── RegistryError       an upload or a variant registration is refused
    ├── RolloutError        a rollout request is refused (unknown target, conflict, state)
    ├── ApiError            (adminclient) what the server's API answered to the admin CLI
    └── UsageError          (adminclient) a command-line value that can never work

Variant preparation has its own tree in :mod:`prunefleet.server.prepare.errors`.
"""

from prunefleet.shared.errors import PrunefleetError


class ServerError(PrunefleetError):
    pass


class StoreError(ServerError):
    """The database refused or is unreachable; the API answers 503."""


class StoreDataError(StoreError):
    """The database refused a value for good (PostgreSQL takes no NUL character in text,
    nor a number past its column's range): retrying the same write cannot succeed."""


class StoreConflictError(StoreError):
    """A write that broke a unique constraint: another writer stored the same row first."""


class LeaseLostError(StoreError):
    """A fenced write refused: this process no longer holds the lease it writes under
    (another replica took it over, or it lapsed while this one was stalled). Nothing of
    the transaction was written."""


class DistributionError(ServerError):
    pass


class KeyringError(ServerError):
    pass


class RegistryError(ServerError):
    """A refused upload or registration; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class RolloutError(ServerError):
    """Refused rollout request; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status
