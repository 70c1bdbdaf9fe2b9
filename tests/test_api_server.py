"""The server's HTTP API: authentication, refusals that change nothing, the admin CLI,
registration of prepared variants, store failures, and a live key rotation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
import sqlalchemy
from conftest import free_port, wait_for_port
from fleet_helpers import wait_for
from onnx_models import make_mlp
from rollout_helpers import Fleet
from test_prepare_recipe import NO_DATA

from prunefleet.server import cli
from prunefleet.server.adminclient import AdminClient, ApiError
from prunefleet.shared.messages import Golden, Manifest, SignedManifest, decode
from prunefleet.shared.signing import TrustedKeys, keyid_of, load_public_pem


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


def _raw(url: str, method: str = "GET", token: str | None = None, body: bytes | None = None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_token_is_required_and_created_private(fleet):
    url = fleet.svc.url
    mode = stat.S_IMODE(os.stat(fleet.svc.token_path).st_mode)
    assert mode == 0o600
    status, _, body = _raw(url + "/healthz")
    assert status == 200 and body["broker_connected"] is True
    for token in (None, "wrong-token-of-some-length"):
        for method, path in (("GET", "/v1/devices"), ("GET", "/v1/rollouts"),
                             ("POST", "/v1/rollouts"), ("PUT", "/v1/devices/x/groups")):
            status, headers, body = _raw(url + path, method, token, b"{}")
            assert status == 401, (method, path, token)
            assert headers.get("www-authenticate") == "Bearer"
            assert body["error"]["message"] == "missing or wrong bearer token"
    status, _, _ = _raw(url + "/v1/devices", token=fleet.svc.token)
    assert status == 200
    status, _, spec = _raw(url + "/openapi.json")
    assert status == 200 and "/v1/rollouts/{rollout_id}/rollback" in spec["paths"]


def test_bad_input_is_refused_with_a_clear_error_and_changes_nothing(fleet, tmp_path):
    api = fleet.api
    api.set_groups("known-1", ["lab"])  # registers a device the server has not seen yet
    v1 = fleet.register_mlp("v1", hidden=16)
    before_rollouts = api.rollouts()
    before_variants = api.variants()
    before_devices = api.devices()
    fleet_target = {"kind": "fleet"}

    bad = [
        ({"target": fleet_target, "variants": ["v1"], "surprise": 1}, 422, "surprise"),
        ({"target": fleet_target, "variants": []}, 422, "variants"),
        ({"target": {"kind": "devices"}, "variants": ["v1"]}, 422, "at least one device"),
        ({"target": {"kind": "group"}, "variants": ["v1"]}, 422, "group name"),
        ({"target": {"kind": "moon"}, "variants": ["v1"]}, 422, "target.kind"),
        ({"target": fleet_target, "variants": ["v1"], "config": {"canary_percent": 150}},
         422, "canary_percent"),
        ({"target": fleet_target, "variants": ["v1"], "config": {"failure_threshold": 1}},
         422, "failure_threshold"),
        ({"target": fleet_target, "variants": ["nope"]}, 404, "no registered variant 'nope'"),
        ({"target": fleet_target, "variants": ["v1", "v1"]}, 422, "unique"),
        ({"target": fleet_target, "variants": ["v1"], "pinned_variant": "other"}, 422,
         "pinned variant"),
        ({"target": {"kind": "devices", "devices": ["ghost"]}, "variants": ["v1"]}, 404,
         "unknown device(s): ghost"),
        ({"target": {"kind": "group", "group": "empty"}, "variants": ["v1"]}, 422,
         "group 'empty' has no devices"),
        ({"target": {"kind": "devices", "devices": ["../x"]}, "variants": ["v1"]}, 422,
         "target.devices"),
    ]
    for body, status, words in bad:
        with pytest.raises(ApiError) as e:
            api.create_rollout(body)
        assert e.value.status == status, (body, e.value)
        assert words in str(e.value), (body, e.value)

    status, _, body = _raw(fleet.svc.url + "/v1/rollouts", "POST", fleet.svc.token,
                           b"{not json")
    assert status == 422 and body["error"]["message"]

    for rid, action, status in ((99, "pause", 404), (99, "rollback", 404)):
        with pytest.raises(ApiError) as e:
            api.rollout_action(rid, action)
        assert e.value.status == status
    with pytest.raises(ApiError) as e:
        api.rollout(0)
    assert e.value.status == 422

    # Uploads: the digest in the URL must match the bytes; nothing is kept otherwise.
    path = make_mlp(tmp_path / "x.onnx", 8)
    data = path.read_bytes()
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ApiError) as e:
        api.request("PUT", f"/v1/blobs/{wrong}", data=data, length=len(data),
                    content_type="application/octet-stream")
    assert e.value.status == 422 and "not " + wrong in str(e.value)
    assert not list((fleet.state_dir / "blobs").glob(f"{wrong}*"))
    assert not list((fleet.state_dir / "blobs").glob(".upload-*"))
    not_onnx = b"definitely not a model"
    digest = hashlib.sha256(not_onnx).hexdigest()
    api.request("PUT", f"/v1/blobs/{digest}", data=not_onnx, length=len(not_onnx),
                content_type="application/octet-stream")
    for meta, status, words in (
        ({"name": "x", "sha256": digest, "macs": 1}, 422, "not an ONNX model"),
        ({"name": "x", "sha256": "0" * 64, "macs": 1}, 404, "no uploaded file"),
        ({"name": "x y", "sha256": v1["sha256"], "macs": 1}, 422, "name"),
        ({"name": "x", "sha256": v1["sha256"]}, 422, "macs"),
        ({"name": "x", "sha256": v1["sha256"], "macs": 1, "chunk_bytes": 10}, 422,
         "chunk_bytes"),
    ):
        with pytest.raises(ApiError) as e:
            api.request("POST", "/v1/variants", meta)
        assert e.value.status == status and words in str(e.value), (meta, e.value)
    with pytest.raises(ApiError) as e:
        api.set_groups("known-1", ["no spaces allowed"])
    assert e.value.status == 422

    assert api.rollouts() == before_rollouts == []
    assert api.variants() == before_variants
    assert api.devices() == before_devices

    # Two unfinished rollouts may not fight over a device, unless one supersedes.
    r1 = api.create_rollout({"target": {"kind": "group", "group": "lab"}, "variants": ["v1"]})
    with pytest.raises(ApiError) as e:
        api.create_rollout({"target": fleet_target, "variants": ["v1"]})
    assert e.value.status == 409 and f"#{r1['id']}" in str(e.value)
    with pytest.raises(ApiError) as e:
        api.rollout_action(r1["id"], "resume")
    assert e.value.status == 409 and "only a paused or halted" in str(e.value)
    r2 = api.create_rollout({"target": fleet_target, "variants": ["v1"], "supersede": True})
    assert api.rollout(r1["id"])["status"] == "superseded"
    assert [r["id"] for r in api.rollouts()] == [r1["id"], r2["id"]]


def test_admin_cli_talks_to_the_server(fleet, capsys, monkeypatch):
    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    fleet.start_agent("cli-0")
    fleet.wait_known(["cli-0"])
    path = make_mlp(fleet.tmp / "m.onnx", 16)
    assert cli.main(["variants", "register", str(path), "--name", "m16", "--macs", "1184",
                     "--chunk-bytes", "4096"]) == 0
    assert "registered m16" in capsys.readouterr().out
    assert cli.main(["devices", "set-groups", "cli-0", "lab"]) == 0
    assert cli.main(["rollout", "create", "--variant", "m16", "--group", "lab",
                     "--policy", "battery_critical_percent=50"]) == 2
    assert "invalid policy override" in capsys.readouterr().err  # above battery_low: refused
    assert cli.main(["rollout", "create", "--variant", "m16", "--group", "lab",
                     "--policy", "battery_low_percent=40", "--policy", "min_dwell_s=0.5"]) == 0
    out = capsys.readouterr().out
    assert "created rollout #1" in out
    wait_for(lambda: "m16" in fleet.agent("cli-0").pool.table, 20, what="install")
    # the policy travelled in the signed desired state
    assert fleet.agent("cli-0").policy.battery_low_percent == 40
    fleet.wait_rollout(1, "completed")
    assert cli.main(["rollout", "status", "1"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "cli-0" in out
    assert cli.main(["devices"]) == 0
    assert "cli-0" in capsys.readouterr().out
    assert cli.main(["rollout", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "completed"
    assert cli.main(["rollout", "pause", "1"]) == 1
    assert "is completed, not active (HTTP 409)" in capsys.readouterr().err
    assert cli.main(["rollout", "status", "1", "--token", "wrong-token-wrong-token"]) == 1
    assert "missing or wrong bearer token (HTTP 401)" in capsys.readouterr().err
    assert cli.main(["telemetry"]) == 0
    assert "devices" in capsys.readouterr().out


def test_key_rotation_signs_with_both_keys_until_retired(fleet, capsys):
    keys = fleet.state_dir / "keys"
    old_pub = load_public_pem((keys / "public.pem").read_bytes())
    old_agent = fleet.start_agent("k-old")  # pins the old key only
    fleet.wait_known(["k-old"])
    fleet.register_mlp("v1", hidden=16)
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["k-old"]},
                                  "variants": ["v1"]})
    fleet.wait_rollout(r["id"], "completed")

    def signatures(device: str) -> tuple[int, SignedManifest]:
        row = fleet.svc.store.latest_manifest(device)
        return row.version, decode(SignedManifest, row.signed)

    def signers(device: str) -> set[str]:
        """The keys that signed the device's desired state (beside their certificates)."""
        pinned = {keyid_of(load_public_pem(p.read_bytes()))
                  for p in keys.glob("*public.pem")} | {keyid_of(old_pub)}
        return {s.keyid for s in signatures(device)[1].signatures} & pinned

    before, _ = signatures("k-old")
    assert cli.main(["keys", "rotate", "--dir", str(keys)]) == 0
    assert "previous" in capsys.readouterr().out
    assert cli.main(["keys", "rotate", "--dir", str(keys)]) == 1, "one rotation at a time"
    assert "already in progress" in capsys.readouterr().err
    new_pub = load_public_pem((keys / "public.pem").read_bytes())
    # The running server picks the rotation up and re-signs the retained desired state.
    wait_for(lambda: len(signers("k-old")) == 2, 10,
             what="the desired state re-signed with both keys")
    version, signed = signatures("k-old")
    assert version > before
    TrustedKeys([old_pub]).verify(signed)
    TrustedKeys([new_pub]).verify(signed)
    wait_for(lambda: old_agent.store.accepted_version() == version, 10,
             what="the old-key agent to accept the re-signed state")
    keys_now = fleet.api.request("GET", "/v1/keys")
    assert keys_now["previous"] is not None and keys_now["current"] != keys_now["previous"]

    new_agent = fleet.start_agent("k-new", trusted=[keys / "public.pem"])  # new key only
    fleet.wait_known(["k-new"])
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["k-new"]},
                                  "variants": ["v1"]})
    fleet.wait_rollout(r["id"], "completed")
    assert "v1" in new_agent.pool.table

    assert cli.main(["keys", "retire", "--dir", str(keys)]) == 0
    wait_for(lambda: signers("k-new") == {keyid_of(new_pub)}, 10,
             what="the desired state re-signed with the new key only")
    assert fleet.api.request("GET", "/v1/keys")["previous"] is None
    assert not (keys / "previous.pem").exists()
    version, signed = signatures("k-new")
    TrustedKeys([new_pub]).verify(signed)
    wait_for(lambda: new_agent.store.accepted_version() == version, 10,
             what="the new-key agent to accept it")
    # An agent that still pins only the retired key refuses, and keeps serving.
    wait_for(lambda: old_agent.counters.rejected_manifests >= 1, 10,
             what="the old-key agent to refuse a manifest it cannot verify")
    assert "v1" in old_agent.pool.table


def test_client_reports_an_unreachable_server():
    with pytest.raises(ApiError, match="cannot reach the server"):
        AdminClient("http://127.0.0.1:9", "t" * 20, timeout_s=2).rollouts()


@pytest.mark.timeout(60)
def test_serve_process_starts_answers_and_stops_on_sigterm(tmp_path, mosquitto):
    port = free_port()
    state = tmp_path / "srv"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunefleet.server.cli", "serve", "--broker", mosquitto.url,
         "--state-dir", str(state), "--keys", str(state / "keys"),
         "--listen", f"127.0.0.1:{port}", "--prefix", f"t{uuid.uuid4().hex[:8]}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: (state / "api-token").exists() and wait_for_port("127.0.0.1", port,
                                                                          0.2),
                 30, what="the server to listen", procs=[proc])
        token = (state / "api-token").read_text().strip()
        assert AdminClient(url, token).health()["broker_connected"] is True
        assert AdminClient(url, token).devices() == []
        assert (state / "keys" / "public.pem").exists()
        assert (state / "fleet.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out.decode()
    assert f"API {url}" in out.decode()


def test_cli_registers_every_variant_of_a_prepare_report(fleet, capsys, monkeypatch):
    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    out = fleet.tmp / "prepared"
    out.mkdir()
    entries = []
    for name, hidden, acc in (("big", 64, 0.97), ("small", 8, 0.91)):
        make_mlp(out / f"{name}.onnx", hidden)
        entries.append({"name": name, "file": f"{name}.onnx", "technique": "structured",
                        "macs": 74 * hidden, "params": 74 * hidden, "accuracy": acc,
                        "latency_ms_p50": 0.01, "input_shape": [1, 1, 8, 8],
                        "num_classes": 10})
    (out / "report.json").write_text(json.dumps({"variants": entries}))
    assert cli.main(["variants", "register", str(out / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert "registered big" in printed and "registered small" in printed
    assert cli.main(["variants", "list", "--json"]) == 0
    listed = {v["name"]: v for v in json.loads(capsys.readouterr().out)}
    assert listed["small"]["accuracy"] == 0.91 and listed["big"]["macs"] == 74 * 64
    (out / "bad.json").write_text("{}")
    assert cli.main(["variants", "register", str(out / "bad.json")]) == 2
    assert "not a prepare report" in capsys.readouterr().err



@pytest.mark.slow
def test_cli_registers_a_prepared_int8_variant_with_the_golden_pair_prepare_chose(
        fleet, capsys, monkeypatch, torch_one_thread):
    """`variants register report.json` keeps the golden input and the INT8 tolerance that
    `prepare` chose, as the demo does: the manifest carries the report's, not new ones."""
    recipe = fleet.tmp / "recipe.toml"
    recipe.write_text(NO_DATA)  # dense, s50 and s50-int8, without data
    out = fleet.tmp / "prepared"
    assert cli.main(["prepare", str(recipe), "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    by_name = {v["name"]: v for v in report["variants"]}
    assert set(by_name) == {"dense", "s50", "s50-int8"}
    int8 = Golden(**by_name["s50-int8"]["golden"])
    assert int8.atol > 1e-3, "prepare widens the tolerance for INT8"

    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    capsys.readouterr()
    assert cli.main(["variants", "register", str(out / "report.json"),
                     "--chunk-bytes", "4096"]) == 0, capsys.readouterr().err
    assert "registered s50-int8" in capsys.readouterr().out
    assert cli.main(["variants", "list"]) == 0
    techniques = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines()}
    assert techniques["s50-int8"] == "structured+int8" and techniques["s50"] == "structured"

    fleet.start_agent("int8-0")
    fleet.wait_known(["int8-0"])
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": ["int8-0"]},
                                  "variants": ["dense", "s50-int8"]})
    fleet.wait_rollout(r["id"], "completed")  # the agent's smoke test passed on them
    row = fleet.svc.store.latest_manifest("int8-0")
    manifest = decode(Manifest, decode(SignedManifest, row.signed).payload)
    published = {v.name: v.golden for v in manifest.variants}
    assert published["s50-int8"] == int8
    assert published["dense"] == Golden(**by_name["dense"]["golden"])
    assert published["dense"].input_b64 == int8.input_b64  # one input, chosen for its margin

    # A golden pair the model does not reproduce, or of the wrong shape, is refused (4xx)
    # and changes nothing.
    before = fleet.api.variants()
    y = np.frombuffer(base64.b64decode(int8.output_b64), np.float32).copy()
    y[int(np.argmax(y))] += 10 * int8.atol + 1.0
    wrong_output = int8.model_copy(update={"output_b64": base64.b64encode(y.tobytes()).decode()})
    short_input = int8.model_copy(update={"input_b64": base64.b64encode(
        np.zeros(10, np.float32).tobytes()).decode()})
    body = {"name": "s50-int8", "sha256": by_name["s50-int8"]["sha256"],
            "macs": by_name["s50-int8"]["macs"]}
    for golden, words in ((wrong_output, "golden output is not what the model computes"),
                          (short_input, "golden input has 10 float32 values")):
        with pytest.raises(ApiError) as e:
            fleet.api.request("POST", "/v1/variants",
                              {**body, "golden": golden.model_dump(mode="json")})
        assert e.value.status == 422 and words in str(e.value), e.value
    with pytest.raises(ApiError) as e:
        fleet.api.request("POST", "/v1/variants", {**body, "input_shape": [1, 1, 4, 4]})
    assert e.value.status == 422 and "does not fit the model's input" in str(e.value)
    for shape in ([1, -3], [1, 0], [1, 10**13], [1, 4096, 4096, 2]):  # was 500, or stored
        with pytest.raises(ApiError) as e:
            fleet.api.request("POST", "/v1/variants", {**body, "input_shape": shape})
        assert e.value.status == 422, (shape, e.value)
    assert fleet.api.variants() == before
    assert fleet.svc.store.variant("s50-int8").spec["golden"] == int8.model_dump(mode="json")


def test_a_store_failure_is_a_503_and_one_line_from_the_cli(fleet, capsys, monkeypatch):
    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    with fleet.svc.store.engine.begin() as conn:
        conn.execute(sqlalchemy.text("DROP TABLE switches"))  # a database gone wrong
    status, _, body = _raw(fleet.svc.url + "/v1/telemetry/summary", token=fleet.svc.token)
    assert status == 503 and body["error"]["message"] == "store unavailable"
    assert cli.main(["telemetry"]) == 1
    err = capsys.readouterr().err
    assert "store unavailable (HTTP 503)" in err and "Traceback" not in err


def test_health_says_when_the_store_is_out_of_reach_and_readiness_refuses(tmp_path,
                                                                          mosquitto):
    """The server's PostgreSQL goes away on the network: ``/healthz`` said ``ok`` (it
    looked at the broker only). Now it says ``degraded`` with ``store_reachable`` false,
    still 200 (the process lives: a supervisor restarting it would bring nothing back),
    and ``/readyz`` answers 503 so that a load balancer sends operators to a replica that
    can serve them; both are ok again once the database is back."""
    from fleet_helpers import TcpRelay
    from rollout_helpers import pg_schema_url
    from sqlalchemy.engine import make_url

    schema = pg_schema_url()
    url = make_url(next(schema))
    relay = TcpRelay(url.host or "127.0.0.1", url.port or 5432)
    f = Fleet(tmp_path, mosquitto.url, db_url=url.set(host="127.0.0.1", port=relay.port)
              .render_as_string(hide_password=False))
    try:
        f.start_server()

        def reachable(want: bool) -> None:
            """/healthz says so within a few seconds (it asks the store at most once a
            second, and waits 2 s for an answer)."""
            wait_for(lambda: _raw(f.svc.url + "/healthz")[2]["store_reachable"] is want, 15,
                     what=f"store_reachable {want}")

        for path in ("/healthz", "/readyz"):
            status, _, body = _raw(f.svc.url + path)
            assert (status, body["status"], body["store_reachable"]) == (200, "ok", True)
        relay.cut()
        reachable(False)
        status, _, body = _raw(f.svc.url + "/healthz")
        assert (status, body["status"], body["broker_connected"]) == (200, "degraded", True)
        status, _, body = _raw(f.svc.url + "/readyz")
        assert (status, body["status"], body["store_reachable"]) == (503, "degraded", False)
        relay.restore()
        reachable(True)
        assert _raw(f.svc.url + "/readyz")[0] == 200
        # A network that drops everything: no refusal comes, and the health routes said
        # nothing until TCP gave up (minutes), holding a thread each. Each answer now
        # comes within the 10 s the client waits (_raw), and says unreachable.
        relay.silence()
        reachable(False)
        status, _, body = _raw(f.svc.url + "/healthz")
        assert (status, body["status"], body["store_reachable"]) == (200, "degraded", False)
        assert _raw(f.svc.url + "/readyz")[0] == 503
    finally:
        relay.close()  # first: threads waiting on the silent database get their error
        f.close()
        schema.close()


def test_no_interactive_docs_and_no_link_to_them_but_the_openapi_description(fleet):
    """/docs and /redoc would need assets from the internet: they say where the OpenAPI
    description is, and nothing the server or its docs show links to them."""
    import re
    from pathlib import Path

    url = fleet.svc.url
    for path in ("/docs", "/redoc"):
        status, _, body = _raw(url + path)
        assert status == 404 and "GET /openapi.json" in body["error"]["message"], body
    status, _, spec = _raw(url + "/openapi.json")
    assert status == 200 and spec["info"]["title"] == "prunefleet server"
    assert "/docs" not in spec["paths"] and "/redoc" not in spec["paths"]
    repo = Path(__file__).resolve().parent.parent
    link = re.compile(r"""[\s"'`(=]/(docs|redoc)\b(?![/.\w])""")
    for f in [repo / "README.md", *(repo / "docs").glob("*.md"),
              *(repo / "server" / "static").iterdir()]:
        found = [m.group(0) for m in link.finditer(f.read_text(errors="replace"))]
        assert not found, f"{f.name} links to {found}"


def test_a_new_api_token_is_never_taken_for_an_option(tmp_path):
    """`--token <token>` on the command line: a token starting with "-" would be read as
    an option (1 in 64 of URL-safe base64 tokens did, and a test run met one). Made
    tokens are 0600 files of at least 16 characters that a command line passes as is."""
    from prunefleet.server.api import load_or_create_token
    from prunefleet.server.cli import build_parser

    tokens = [load_or_create_token(tmp_path / f"t{i}" / "token") for i in range(300)]
    assert not [t for t in tokens if t.startswith("-") or len(t) < 16]
    assert stat.S_IMODE((tmp_path / "t0" / "token").stat().st_mode) == 0o600
    for t in tokens[:20]:
        args = build_parser().parse_args(["devices", "list", "--token", t])
        assert args.token == t
    assert load_or_create_token(tmp_path / "t0" / "token") == tokens[0]  # kept
