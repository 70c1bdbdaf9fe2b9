"""Provisioning: `prunefleet ca init`, `devices provision` and `devices revoke`, with a real
agent process against real mosquitto running the shipped production config."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fleet_helpers import spawn_agent, stop_agent, wait_for
from prod_broker import SERVER_PASSWORD, Refused, connect, start_production_broker

from prunefleet.agent.build import broker_address
from prunefleet.agent.config import load_config
from prunefleet.server.provision import (
    PasswordFile,
    ProvisionError,
    password_line,
    provision_device,
    verify_password_line,
)
from prunefleet.shared.messages import ReportedState, decode


def _prunefleet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunefleet.server.cli", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          timeout=60)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _provision(tmp_path: Path, broker_url: str, device: str = "dev-9",
               passwd: Path | None = None, ca: Path | None = None) -> Path:
    """`ca init` (kept if there is one), `keys init`, `devices provision DEVICE`."""
    ca = ca or tmp_path / "ca"
    keys, bundle = tmp_path / "keys", tmp_path / f"bundle-{device}"
    for args in (("ca", "init", "--ca-dir", str(ca)), ("keys", "init", "--keys", str(keys))):
        r = _prunefleet(*args)
        assert r.returncode == 0, r.stderr
    r = _prunefleet("devices", "provision", device, "--broker", broker_url,
                    "--passwd-file", str(passwd or tmp_path / "passwd"),
                    "--out", str(bundle), "--ca-dir", str(ca), "--keys", str(keys),
                    "--install-dir", str(bundle), "--api-socket", str(tmp_path / "api.sock"),
                    "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bundle"] == str(bundle)
    return bundle


def test_ca_init_makes_a_private_key_and_keeps_an_existing_ca(tmp_path) -> None:
    r = _prunefleet("ca", "init", "--ca-dir", str(tmp_path / "ca"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["created"] is True, r.stderr
    assert _mode(tmp_path / "ca" / "ca.key") == 0o600
    before = (tmp_path / "ca" / "ca.crt").read_bytes()
    r = _prunefleet("ca", "init", "--ca-dir", str(tmp_path / "ca"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["created"] is False
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == before


def test_the_bundle_is_private_and_the_config_holds_no_secret(tmp_path) -> None:
    bundle = _provision(tmp_path, "mqtts://broker.example.org:8883")
    assert _mode(bundle) == 0o700
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert {p.relative_to(bundle).as_posix() for p in files} == {
        "agent.toml", "ca.crt", "broker-password", "trusted-keys/server-0.pem"}
    assert all(_mode(p) == 0o600 for p in files), {str(p): oct(_mode(p)) for p in files}
    password = (bundle / "broker-password").read_text().strip()
    assert len(password) >= 32 and password not in (bundle / "agent.toml").read_text()
    cfg = load_config(bundle / "agent.toml", env={})
    address = broker_address(cfg)
    assert (address.host, address.port, address.tls) == ("broker.example.org", 8883, True)
    assert (address.username, address.password) == ("dev-9", password)
    entry = PasswordFile(tmp_path / "passwd").entry("dev-9")
    assert entry is not None and verify_password_line(entry, password)
    assert _mode(tmp_path / "passwd") == 0o600


def test_provisioning_refuses_what_would_leak_or_clash(tmp_path) -> None:
    from prunefleet.server.keys import load_or_create
    from prunefleet.server.provision import init_ca

    init_ca(tmp_path / "ca")
    load_or_create(tmp_path / "keys")
    common = {"passwd_file": tmp_path / "passwd", "ca_dir": tmp_path / "ca",
              "trusted_keys": [tmp_path / "keys" / "public.pem"]}
    for device, url, words in [
        ("dev-1", "mqtt://broker:1883", "over TLS"),
        ("dev-1", "mqtts://dev-1:pw@broker:8883", "without credentials"),
        ("server", "mqtts://broker:8883", "reserved"),
    ]:
        with pytest.raises(ProvisionError, match=words):
            provision_device(device, out_dir=tmp_path / "b", broker_url=url, **common)
    assert not (tmp_path / "passwd").exists()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_password_entries_match_mosquitto_passwd(tmp_path) -> None:
    f = tmp_path / "pw"
    f.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(f), "alice", "s3cret"], check=True)
    line = f.read_text().strip()
    assert line.startswith("alice:$7$")
    assert verify_password_line(line, "s3cret") and not verify_password_line(line, "s3cre")
    assert verify_password_line(password_line("bob", "x"), "x")


def test_a_provisioned_agent_is_accepted_and_a_revoked_one_refused(tmp_path) -> None:
    broker = start_production_broker(tmp_path / "broker")
    passwd = tmp_path / "broker" / "passwd"
    agent = None
    try:
        bundle = _provision(tmp_path, f"mqtts://127.0.0.1:{broker.port}", passwd=passwd,
                            ca=tmp_path / "broker" / "ca")
        broker.reload()
        config = tmp_path / "agent.toml"  # the bundle's config, run here, not under /etc
        config.write_text((bundle / "agent.toml").read_text() + f'state_dir = "{tmp_path}/st"\n'
                          'reconnect_max_s = 1.0\n[sensors]\nkind = "simulated"\n')
        password = (bundle / "broker-password").read_text().strip()
        reported = "prunefleet/devices/dev-9/reported"
        with connect(broker, "server", SERVER_PASSWORD, subscribe=[reported]) as server:
            agent = spawn_agent(config, tmp_path / "agent.log")

            def state() -> ReportedState:
                return decode(ReportedState, server.get(30).payload)

            assert wait_for(lambda: state().online, 30, what="the agent online",
                            procs=[agent])
            r = _prunefleet("devices", "revoke", "dev-9", "--passwd-file", str(passwd),
                            "--broker-only", "--json")
            assert r.returncode == 0 and json.loads(r.stdout)["broker_entry_removed"], r.stderr
            broker.reload()
            # The reload is asynchronous: once it is done the password is refused...
            assert wait_for(lambda: _refused(broker, "dev-9", password), 20,
                            what="the revoked password refused")
            # ...and mosquitto dropped the agent's connection (no Last Will: the broker
            # closed it), so the agent's reconnects are refused too.
            log = tmp_path / "agent.log"
            assert wait_for(lambda: "refused the connection: Not authorized" in log.read_text(),
                            20, what="the agent refused")
        assert agent.poll() is None, "the agent keeps trying; it must not crash"
    finally:
        if agent is not None:
            stop_agent(agent)
        broker.stop()


def _refused(broker, user: str, password: str) -> bool:
    try:
        with connect(broker, user, password):
            return False
    except Refused:
        return True


@pytest.fixture
def server(tmp_path, mosquitto):
    from prunefleet.server.serve import FleetService, ServeOptions

    prefix = f"t{uuid.uuid4().hex[:10]}"
    svc = FleetService(ServeOptions(
        state_dir=tmp_path / "server", broker_url=mosquitto.url, listen="127.0.0.1:0",
        prefix=prefix, tick_s=0.2, client_id=f"pf-test-{prefix}",
    )).start()
    yield svc
    svc.stop()


def test_revoke_marks_the_device_revoked_at_the_server(server, tmp_path) -> None:
    from prunefleet.server.adminclient import AdminClient

    passwd = tmp_path / "passwd"
    PasswordFile(passwd).set("dev-7", "pw")
    PasswordFile(passwd).set("dev-8", "pw")
    api = AdminClient(server.url, server.token)
    for device in ("dev-7", "dev-8"):
        api.set_groups(device, [])  # known to the server
    env = {"PRUNEFLEET_SERVER": server.url, "PRUNEFLEET_TOKEN": server.token}
    r = _prunefleet("devices", "revoke", "dev-7", "--passwd-file", str(passwd), "--json",
                    env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["broker_entry_removed"] is True and out["revoked_at"] > 0
    assert PasswordFile(passwd).users() == ["dev-8"]
    listed = {d["device_id"]: d["revoked_at"] for d in api.devices()}
    assert listed == {"dev-7": out["revoked_at"], "dev-8": None}


@pytest.mark.skipif(os.geteuid() != 0, reason="install-agent.sh sets owners: needs root")
def test_install_agent_keeps_the_password_from_the_socket_group(tmp_path) -> None:
    import pwd

    bundle = _provision(tmp_path, "mqtts://broker.example.org:8883")
    etc = tmp_path / "etc"
    agent_user = pwd.getpwnam("nobody")  # stands in for the agent's system user
    env = {**os.environ, "PRUNEFLEET_ETC": str(etc), "PRUNEFLEET_USER": "nobody"}
    script = Path(__file__).resolve().parent.parent / "deploy" / "install-agent.sh"
    r = subprocess.run(["sh", str(script), "--config-only", str(bundle)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    secret = (etc / "broker-password").stat()
    assert stat.S_IMODE(secret.st_mode) == 0o600 and secret.st_uid == agent_user.pw_uid
    assert secret.st_gid != agent_user.pw_gid  # the socket group is the agent's group
    config = (etc / "agent.toml").stat()
    assert stat.S_IMODE(config.st_mode) == 0o640
    assert config.st_gid == agent_user.pw_gid
    assert (etc / "broker-password").read_text() == (bundle / "broker-password").read_text()
    assert (etc / "trusted-keys" / "server-0.pem").is_file()

    # a config with the password in its broker URL is refused, and nothing is written
    leaky = tmp_path / "leaky"
    shutil.copytree(bundle, leaky)
    text = (leaky / "agent.toml").read_text()
    (leaky / "agent.toml").write_text(text.replace("mqtts://", "mqtts://dev-9:secret@"))
    env["PRUNEFLEET_ETC"] = str(tmp_path / "etc2")
    r = subprocess.run(["sh", str(script), "--config-only", str(leaky)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "password in broker_url" in r.stderr
    assert not (tmp_path / "etc2").exists()
