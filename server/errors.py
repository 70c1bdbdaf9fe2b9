"""Errors of the server, split by cause.

    ServerError
    ├── StoreError          the database refused or is unreachable
    ├── PrepareError        variant preparation cannot go on (bad recipe, parity failure)
    └── DistributionError   an artifact or manifest cannot be published
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
