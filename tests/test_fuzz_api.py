"""The HTTP API under schemathesis, with every one of its checks, against the server's own
OpenAPI document: a live `prunefleet serve` (in-process, real mosquitto, SQLite).

Every response must be declared (status, content type, schema), a request the document
allows must be accepted and one it forbids refused, a 405 names what is allowed, and no
input answers 500. Bounded: a fixed seed and ten examples per operation in the default
suite; the coverage phase (every boundary, every undeclared method: minutes) runs in the
system suite, and what it found is kept here as fast tests. Checks turned off for one
operation are in tests/schemathesis.toml, each with its reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from email.message import Message
from pathlib import Path

import pytest

CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture
def served(tmp_path, mosquitto):
    from prunefleet.server.serve import FleetService, ServeOptions

    prefix = f"t{uuid.uuid4().hex[:10]}"
    svc = FleetService(ServeOptions(
        state_dir=tmp_path / "server", broker_url=mosquitto.url, listen="127.0.0.1:0",
        prefix=prefix, tick_s=0.5, client_id=f"pf-test-{prefix}",
    )).start()
    yield svc
    svc.stop()


def _schemathesis(served, cwd: Path, phases: str, max_examples: int) -> None:
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a dev dependency: pip install -e '.[dev]'"
    r = subprocess.run(
        [st, "--config-file", str(CONFIG), "--no-color", "run", f"{served.url}/openapi.json",
         # every check runs (schemathesis 4's default; `--checks all` would also override
         # the per-operation exceptions of the config file)
         "--phases", phases, "--max-examples", str(max_examples), "--seed", "20240611",
         "--workers", "1", "--generation-database", "none", "--suppress-health-check", "all",
         "--header", f"Authorization: Bearer {served.token}"],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )
    assert r.returncode == 0, r.stdout[-12000:] + r.stderr[-2000:]


def test_the_api_keeps_its_openapi_document(served, tmp_path) -> None:
    """Examples, fuzzing (valid and invalid requests) and stateful sequences."""
    _schemathesis(served, tmp_path, "examples,fuzzing,stateful", max_examples=10)


@pytest.mark.system
def test_the_api_keeps_its_openapi_document_on_every_boundary(served, tmp_path) -> None:
    """All phases, the coverage phase too (every boundary value of every parameter, every
    undeclared method on every path: minutes), with more examples: the system suite."""
    _schemathesis(served, tmp_path, "examples,coverage,fuzzing,stateful", max_examples=25)


# What the coverage phase found, kept fast in the default suite.

def _call(served, method: str, path: str) -> tuple[int, Message, dict]:
    req = urllib.request.Request(served.url + path, method=method,
                                 headers={"Authorization": f"Bearer {served.token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def test_an_id_beyond_the_database_integers_is_refused_not_a_server_error(served) -> None:
    for path in ("/v1/rollouts/" + "9" * 32, "/v1/rollouts/" + "9" * 32 + "/pause"):
        status, _, body = _call(served, "POST" if path.endswith("pause") else "GET", path)
        assert status == 422, (path, status, body)
        assert "rollout_id" in body["error"]["message"]
    status, _, body = _call(served, "GET", "/v1/rollouts/2147483647")
    assert status == 404 and body["error"]["message"] == "no rollout #2147483647"


def test_a_405_names_every_method_of_its_path(served) -> None:
    for method, path, allowed in [
        ("TRACE", "/healthz", "GET"),
        ("DELETE", "/v1/rollouts", "GET, POST"),
        ("OPTIONS", "/v1/variants", "GET, POST"),
        ("PATCH", "/v1/devices/d-1/groups", "PUT"),
    ]:
        status, headers, body = _call(served, method, path)
        assert (status, headers.get("Allow")) == (405, allowed), (method, path, body)
