"""The admin CLI's client of the server's HTTP API (stdlib only: urllib).

Where the token comes from, first found wins: ``--token``, ``$PRUNEFLEET_TOKEN``, the
file given by ``--token-file``, ``<state dir>/api-token`` of a local ``prunefleet serve``.

Errors (both :class:`~prunefleet.server.errors.ServerError`, each one line):

    ApiError     the server refused a request, or could not be reached (exit code 1)
    UsageError   the command line asks for something that can never work (exit code 2)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prunefleet.shared.errors import PrunefleetError
from prunefleet.shared.topics import check_name

from .errors import ServerError

DEFAULT_SERVER = "http://127.0.0.1:8080"
DEFAULT_TOKEN_FILE = Path(".prunefleet/server/api-token")


class ApiError(ServerError):
    """The server refused a request (``status`` > 0) or could not be reached (0)."""

    def __init__(self, message: str, status: int = 0, details: list | None = None):
        super().__init__(message)
        self.status = status
        self.details = details or []


class UsageError(ServerError):
    """A value on the command line that can never work (a bad id, URL or setting)."""


def check_id(value: str, what: str) -> str:
    """``value`` if it is a valid device, group or variant name; else :class:`UsageError`."""
    try:
        return check_name(value, what)
    except PrunefleetError as e:
        raise UsageError(str(e)) from e


def check_server_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"bad --server {url!r}: expected http://HOST:PORT, "
                         f"e.g. {DEFAULT_SERVER}")
    return url


def find_token(token: str | None, token_file: Path | None) -> tuple[str, str]:
    """``(token, where it came from)``: the source is named when the server refuses it."""
    if token:
        return token, "--token"
    env = os.environ.get("PRUNEFLEET_TOKEN")
    if env:
        return env, "$PRUNEFLEET_TOKEN"
    path = Path(token_file) if token_file else DEFAULT_TOKEN_FILE
    try:
        return path.read_text().strip(), str(path)
    except FileNotFoundError as e:
        raise ApiError(
            f"no API token: pass --token, set PRUNEFLEET_TOKEN, or point --token-file at the "
            f"server's api-token ({path} does not exist)"
        ) from e
    except OSError as e:
        raise ApiError(f"cannot read the API token from {path}: {e.strerror or e}") from e


def _segment(value: object) -> str:
    """One URL path segment: nothing in it can change the path."""
    return urllib.parse.quote(str(value), safe="")


class AdminClient:
    def __init__(self, base_url: str, token: str, timeout_s: float = 60.0,
                 token_source: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.token_source = token_source  # named in the error when the server refuses it

    def request(self, method: str, path: str, body: Any = None, *, data=None,
                length: int | None = None, content_type: str = "application/json",
                text: bool = False) -> Any:
        """The decoded JSON answer (``text=True``: the body as text, e.g. a CSV export)."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            length = len(data)
        if data is not None:
            headers["Content-Type"] = content_type
            if length is not None:
                headers["Content-Length"] = str(length)
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)["error"]
                message, details = str(err["message"]), err.get("details")
            except (ValueError, KeyError, TypeError):
                message, details = f"HTTP {e.code}: {raw[:200]!r}", None
            # One line: the first of a multi-line message says what went wrong.
            message = f"{(message.strip().splitlines() or [''])[0]} (HTTP {e.code})"
            if e.code == 401 and self.token_source:
                message += (f"; the token came from {self.token_source}: it must be the "
                            "server's STATE_DIR/api-token")
            raise ApiError(message, e.code, details) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(
                f"cannot reach the server at {self.base_url} ({reason}): is `prunefleet "
                "serve` running there? Point --server or $PRUNEFLEET_SERVER at its API"
            ) from e
        except ValueError as e:  # a URL urllib cannot use (http.client.InvalidURL)
            raise UsageError(f"bad request URL {self.base_url + path!r}: {e}") from e
        if text:
            return raw.decode()
        return json.loads(raw) if raw else None

    # -- endpoints ------------------------------------------------------------------------
    def health(self) -> dict:
        return self.request("GET", "/healthz")

    def devices(self, group: str | None = None) -> list[dict]:
        query = "?" + urllib.parse.urlencode({"group": group}) if group else ""
        return self.request("GET", "/v1/devices" + query)

    def set_groups(self, device_id: str, groups: list[str]) -> dict:
        return self.request("PUT", f"/v1/devices/{_segment(device_id)}/groups",
                            {"groups": groups})

    def approve_group(self, device_id: str) -> dict:
        return self.request("POST", f"/v1/devices/{_segment(device_id)}/approve")

    def revoke_device(self, device_id: str) -> dict:
        return self.request("POST", f"/v1/devices/{_segment(device_id)}/revoke")

    def delete_device(self, device_id: str) -> dict:
        return self.request("DELETE", f"/v1/devices/{_segment(device_id)}")

    def prune_telemetry(self, older_than_s: float) -> dict:
        return self.request("POST", "/v1/telemetry/prune", {"older_than_s": older_than_s})

    def pin(self, target: str, variant: str | None, group: bool | None = None) -> dict:
        """Pin ``variant`` (None: unpin) on a device or every device of a group, through a
        new signed desired state. ``group`` None: a known device, else a group."""
        body: dict[str, Any] = {"target": target, "variant": variant}
        if group is not None:
            body["kind"] = "group" if group else "device"
        return self.request("POST", "/v1/pins", body)

    def device_history(self, device_id: str, *, since: str | None = None,
                       until: str | None = None, resolution: str | None = None,
                       fmt: str = "json") -> Any:
        """One device's telemetry over a time range, bucketed: a dict (``fmt="json"``) or
        the CSV / JSON-lines text of the export."""
        query = {k: v for k, v in (("since", since), ("until", until),
                                   ("resolution", resolution), ("format", fmt)) if v}
        path = f"/v1/devices/{_segment(device_id)}/telemetry?{urllib.parse.urlencode(query)}"
        return self.request("GET", path, text=fmt != "json")

    def refresh_profiles(self, target: str, group: bool | None = None) -> dict:
        """Ask a device (``group``: every device of a group) to profile its installed
        variants again."""
        body: dict = {"target": target}
        if group is not None:
            body["kind"] = "group" if group else "device"
        return self.request("POST", "/v1/profiles/refresh", body)

    def device_profile(self, device_id: str) -> dict:
        return self.request("GET", f"/v1/devices/{_segment(device_id)}/profile")

    def classes(self) -> dict:
        return self.request("GET", "/v1/classes")

    def class_devices(self, device_class: str) -> dict:
        return self.request("GET", f"/v1/classes/{_segment(device_class)}/devices")

    def variants(self) -> list[dict]:
        return self.request("GET", "/v1/variants")

    def upload(self, path: Path, progress: bool | None = None) -> dict:
        """PUT a file to /v1/blobs/<its sha256>, streamed (with a progress bar on a TTY)."""
        path = Path(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while buf := f.read(1 << 20):
                h.update(buf)
        size = path.stat().st_size
        progress = sys.stderr.isatty() if progress is None else progress
        url = f"/v1/blobs/{h.hexdigest()}"
        with open(path, "rb") as f:
            if not progress:
                return self.request("PUT", url, data=f, length=size,
                                    content_type="application/octet-stream")
            from tqdm import tqdm

            with tqdm.wrapattr(f, "read", total=size, desc=f"upload {path.name}", unit="B",
                               unit_scale=True, file=sys.stderr) as body:
                return self.request("PUT", url, data=body, length=size,
                                    content_type="application/octet-stream")

    def register_variant(self, path: Path, **meta) -> dict:
        blob = self.upload(path)
        return self.request("POST", "/v1/variants", {"sha256": blob["sha256"], **meta})

    def rollouts(self) -> list[dict]:
        return self.request("GET", "/v1/rollouts")

    def rollout(self, rollout_id: int) -> dict:
        return self.request("GET", f"/v1/rollouts/{int(rollout_id)}")

    def create_rollout(self, body: dict) -> dict:
        return self.request("POST", "/v1/rollouts", body)

    def rollout_action(self, rollout_id: int, action: str) -> dict:
        if action not in ("pause", "resume", "rollback"):
            raise ValueError(action)
        return self.request("POST", f"/v1/rollouts/{int(rollout_id)}/{action}")

    def telemetry_summary(self, since: float = 0.0) -> dict:
        query = urllib.parse.urlencode({"since": since})
        return self.request("GET", f"/v1/telemetry/summary?{query}")
