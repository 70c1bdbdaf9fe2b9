"""``prunefleet serve --config FILE``: the server's settings in a TOML file.

The file holds what ``serve``'s options hold, plus the ``[retention]`` job. Precedence:
a command-line option (or the environment variable it defaults to) over the file, the file
over the built-in defaults. Every value is checked before anything starts, and a bad one is
one line naming the file and the key (:class:`ServerConfigError`). ``deploy/server.toml``
is the commented example.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from prunefleet.shared.errors import PrunefleetError
from prunefleet.shared.topics import Topics, check_name
from prunefleet.shared.transport import BrokerAddress

from .errors import ServerError
from .history import parse_duration
from .serve import ServeOptions, parse_listen

# The share group's name keeps devices out of the servers' shared subscription: a device
# that knows it can take a share of the fleet's telemetry (mosquitto 2.0 cannot refuse it).
MIN_SHARE_GROUP_CHARS = 16
MAX_DURATION_S = 100 * 365 * 86400.0


class ServerConfigError(ServerError):
    """The server configuration file is missing, not TOML, or holds a bad value."""


def _duration(value: object) -> object:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30d, 12h or 90m")
    if isinstance(value, str):
        return parse_duration(value)  # its ValueError names the value and gives examples
    return value


Duration = Annotated[float, BeforeValidator(_duration),
                     Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetentionConfig(_Strict):
    """The background job that deletes old telemetry and events (the same deletion as
    ``prunefleet telemetry prune``)."""

    older_than: Duration | None = None
    """Delete telemetry batches (with their per-variant rows, switches and shadow figures)
    and events older than this, e.g. "30d"; unset: keep everything."""
    check_every: Duration = 3600.0
    """How often the job runs, e.g. "1h"; the first run is right after the start."""


class ServerConfig(_Strict):
    """What ``prunefleet serve`` runs with. Keys are the long options' names with ``_``
    for ``-``; relative paths are relative to the working directory, as on the command
    line."""

    broker: str | None = None
    """mqtt://host:port or mqtts://host:port of the broker, user and password in the URL;
    unset: an embedded amqtt broker on loopback."""
    db: str | None = None
    """SQLAlchemy URL of the store, e.g. postgresql://user@host/db; unset: SQLite in
    state_dir."""
    state_dir: Path = Path(".prunefleet/server")
    """API token, client id, uploaded models, the SQLite store."""
    listen: str = "127.0.0.1:8080"
    """HOST:PORT of the HTTP API."""
    keys: Path = Path(".prunefleet/keys")
    """The signing key directory, as `prunefleet keys init` writes it."""
    prefix: str = "prunefleet"
    """MQTT topic prefix, the agents' fleet_prefix."""
    share_group: str | None = None
    """Ingest through $share/GROUP/… when several servers share one broker: a secret of 16
    characters or more."""
    client_id: str | None = None
    """MQTT client id; unset: random, kept in state_dir/client-id."""
    metrics_public: bool = False
    """Serve GET /metrics without the bearer token."""
    device_rate_per_s: float = Field(default=20.0, ge=0, allow_inf_nan=False)
    """Messages per second each device may send; more are dropped and counted (0: no
    limit)."""
    device_burst: float = Field(default=200.0, ge=1, allow_inf_nan=False)
    """Messages a device may send at once."""
    ingest_processes: int = Field(default=0, ge=0, le=64)
    """Check and store device messages in this many worker processes (0: on a thread of
    the server's own process). One Python process tops out near one core; with cores to
    spare, N workers store up to N times as much (docs/ingest.md)."""
    lease_ttl_s: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)
    """A replica that stops renewing its rollout lease hands rollouts over after this."""
    probe_s: float = Field(default=5.0, ge=0, le=600, allow_inf_nan=False)
    """On start, prove within this that the ingest subscription delivers (0: skip)."""
    version_claims: Literal["majority", "certified"] = "majority"
    """How a device's claimed desired-state version counts without the server's version
    certificate, when a new or restored store numbers desired states: "majority" (only
    within the fleet's median claim: agents of an earlier release send none) or
    "certified" (not at all, so no number of lying devices moves the counter: once every
    agent reports certificates)."""
    retention: RetentionConfig = RetentionConfig()

    @field_validator("broker")
    @classmethod
    def _broker(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                BrokerAddress.parse(v)
            except PrunefleetError:
                # Not echoed: the URL may hold the broker password.
                raise ValueError("expected mqtt://host:port or mqtts://host:port") from None
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        try:
            parse_listen(v)
        except ServerError:
            raise ValueError(f"{v!r} is not HOST:PORT, e.g. 127.0.0.1:8080") from None
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        try:
            Topics(v)
        except PrunefleetError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("share_group")
    @classmethod
    def _share_group(cls, v: str | None) -> str | None:
        if v is not None:
            _checked_name(v, "share group")
            if len(v) < MIN_SHARE_GROUP_CHARS:
                raise ValueError(f"must be a secret of {MIN_SHARE_GROUP_CHARS} characters at "
                                 "least (e.g. `openssl rand -hex 16`): a device that knows "
                                 "the name can take a share of the fleet's telemetry")
        return v

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, v: str | None) -> str | None:
        return v if v is None else _checked_name(v, "client id")

    def serve_options(self, overrides: Mapping[str, Any] | None = None) -> ServeOptions:
        """The options ``serve`` runs with: these settings, with each of ``overrides``
        that is not None in place of one (the command line's, checked there). Keys as
        in the file: ``"listen"``, ``"retention.older_than"`` (seconds)."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        settings = {**{k: getattr(self, k) for k in type(self).model_fields},
                    **{f"retention.{k}": getattr(self.retention, k)
                       for k in RetentionConfig.model_fields}}
        unknown = set(given) - set(settings)
        if unknown:
            raise TypeError(f"not a server setting: {', '.join(sorted(unknown))}")
        v = {**settings, **given}
        return ServeOptions(
            state_dir=Path(v["state_dir"]), broker_url=v["broker"], db_url=v["db"],
            listen=v["listen"], key_dir=Path(v["keys"]), prefix=v["prefix"],
            share_group=v["share_group"], client_id=v["client_id"],
            metrics_public=v["metrics_public"], device_rate_per_s=v["device_rate_per_s"],
            device_burst=v["device_burst"], lease_ttl_s=v["lease_ttl_s"],
            ingest_processes=v["ingest_processes"],
            probe_s=v["probe_s"], version_claims=v["version_claims"],
            retention_s=v["retention.older_than"],
            retention_check_s=v["retention.check_every"],
        )


def _checked_name(value: str, what: str) -> str:
    try:
        return check_name(value, what)
    except PrunefleetError as e:
        raise ValueError(str(e)) from None


def load_server_config(path: Path) -> ServerConfig:
    """Read and check ``path``; :class:`ServerConfigError` names the file and the key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ServerConfigError(f"{path}: no such config file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ServerConfigError(f"{path}: cannot read it: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ServerConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ServerConfigError(f"{path}: {_first_error(e)}") from e


def _first_error(e: ValidationError) -> str:
    """One line for the first problem: the key, then what is wrong with it."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    where = ".".join(loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        if len(loc) > 1 and loc[0] == "retention":
            return (f"{where}: unknown setting (known here: "
                    f"{', '.join(RetentionConfig.model_fields)})")
        if loc[-1] in RetentionConfig.model_fields:
            return f"{where}: unknown setting here; it belongs in the [retention] table"
        return f"{where}: unknown setting (known: {', '.join(ServerConfig.model_fields)})"
    if err["type"] == "model_type":
        return f"{where}: expected a table, e.g. [{where}]"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}"
