"""Errors of the server, split by cause.

    ServerError
    ├── StoreError          the database refused or is unreachable
    ├── PrepareError        variant preparation cannot go on (bad recipe, parity failure)
    ├── DistributionError   an artifact or manifest cannot be published
    ├── KeyringError        a signing key is missing, or a rotation step is out of order
    └── RolloutError        a rollout request is refused (unknown target, conflict, state)
"""

from prunefleet.shared.errors import PrunefleetError


class ServerError(PrunefleetError):
    pass


class StoreError(ServerError):
    pass


class PrepareError(ServerError):
    pass


class DistributionError(ServerError):
    pass


class KeyringError(ServerError):
    pass


class RolloutError(ServerError):
    """Refused rollout request; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status
