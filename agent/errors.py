"""Errors of the device agent, split by cause.

    AgentError
    ├── InstallError          a variant that must not serve (load error, smoke test failed)
    ├── InferenceError        a request that cannot be served
    │   ├── BadInputError     wrong shape, dtype or size (the caller's fault)
    │   └── NoVariantError    nothing installed yet
    └── AgentConfigError      a bad configuration value

A broker that cannot be reached is a ``prunefleet.shared.errors.TransportError``.
"""

from prunefleet.shared.errors import PrunefleetError


class AgentError(PrunefleetError):
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
