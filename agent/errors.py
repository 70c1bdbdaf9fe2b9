"""Errors of the device agent, split by cause.

    AgentError
    ├── TransportError        the broker cannot be reached or refused us
    ├── InstallError          a variant that must not serve (load error, smoke test failed)
    ├── InferenceError        a request that cannot be served
    │   ├── BadInputError     wrong shape, dtype or size (the caller's fault)
    │   └── NoVariantError    nothing installed yet
    └── AgentConfigError      a bad configuration value
"""

from prunefleet.shared.errors import PrunefleetError


class AgentError(PrunefleetError):
    pass


class TransportError(AgentError):
    pass


class InstallError(AgentError):
    pass


class InferenceError(AgentError):
    pass


class BadInputError(InferenceError):
    pass


class NoVariantError(InferenceError):
    pass


class AgentConfigError(AgentError):
    pass
