"""``prunefleet serve --config FILE``: the server's settings, and its retention job, in a
TOML file; options on the command line win over it; a bad file is one line and starts
nothing."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import free_port, wait_for_port
from fleet_helpers import wait_for

from prunefleet.server.admin import serve_options
from prunefleet.server.adminclient import AdminClient
from prunefleet.server.cli import build_parser, main
from prunefleet.server.serverconfig import ServerConfigError, load_server_config
from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared.messages import TelemetryBatch

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "server.toml"
DAY = 86400.0


def _options(tmp_path: Path, toml: str | None, *argv: str, env: dict | None = None,
             monkeypatch: pytest.MonkeyPatch | None = None):
    """The options ``prunefleet serve [--config FILE] ARGV`` would run with."""
    if monkeypatch is not None:
        for k in ("PRUNEFLEET_RETENTION", "PRUNEFLEET_SHARE_GROUP"):
            monkeypatch.delenv(k, raising=False)
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
    config = []
    if toml is not None:
        path = tmp_path / "server.toml"
        path.write_text(toml)
        config = ["--config", str(path)]
    return serve_options(build_parser().parse_args(["serve", *config, *argv]))


def test_the_example_file_is_what_the_docs_say(tmp_path):
    cfg = load_server_config(EXAMPLE)
    assert (cfg.retention.older_than, cfg.retention.check_every) == (30 * DAY, 3600.0)
    opts = cfg.serve_options()
    assert opts.broker_url is not None and opts.broker_url.startswith("mqtts://")
    assert (opts.retention_s, opts.retention_check_s) == (30 * DAY, 3600.0)
    assert (opts.listen, opts.prefix, opts.metrics_public) == ("127.0.0.1:8080", "prunefleet",
                                                               False)
    assert (opts.device_rate_per_s, opts.device_burst) == (20.0, 200.0)
    assert opts.state_dir == Path("/var/lib/prunefleet/server")
    assert opts.key_dir == Path("/var/lib/prunefleet/keys")


def test_without_a_file_serve_runs_on_the_defaults_it_always_had(tmp_path, monkeypatch):
    opts = _options(tmp_path, None, monkeypatch=monkeypatch)
    assert (opts.state_dir, opts.key_dir) == (Path(".prunefleet/server"),
                                              Path(".prunefleet/keys"))
    assert (opts.broker_url, opts.db_url, opts.listen, opts.prefix) == (
        None, None, "127.0.0.1:8080", "prunefleet")
    assert (opts.share_group, opts.client_id, opts.metrics_public) == (None, None, False)
    assert (opts.device_rate_per_s, opts.device_burst) == (20.0, 200.0)
    assert (opts.retention_s, opts.retention_check_s) == (None, 3600.0)
    assert (opts.lease_ttl_s, opts.probe_s) == (10.0, 5.0)


FILE = """
broker = "mqtt://broker.example.org:1883"
db = "postgresql://fleet@db/fleet"
state_dir = "/srv/pf"
keys = "/srv/pf-keys"
listen = "0.0.0.0:9000"
prefix = "plant"
share_group = "0123456789abcdef0123"
client_id = "pf-a"
metrics_public = true
device_rate_per_s = 5
device_burst = 50
lease_ttl_s = 30
probe_s = 0

[retention]
older_than = "14d"
check_every = "10m"
"""


def test_the_file_sets_every_option(tmp_path, monkeypatch):
    opts = _options(tmp_path, FILE, monkeypatch=monkeypatch)
    assert (opts.broker_url, opts.db_url, opts.listen, opts.prefix) == (
        "mqtt://broker.example.org:1883", "postgresql://fleet@db/fleet", "0.0.0.0:9000", "plant")
    assert (opts.state_dir, opts.key_dir) == (Path("/srv/pf"), Path("/srv/pf-keys"))
    assert (opts.share_group, opts.client_id, opts.metrics_public) == (
        "0123456789abcdef0123", "pf-a", True)
    assert (opts.device_rate_per_s, opts.device_burst) == (5.0, 50.0)
    assert (opts.lease_ttl_s, opts.probe_s) == (30.0, 0.0)
    assert (opts.retention_s, opts.retention_check_s) == (14 * DAY, 600.0)


def test_options_on_the_command_line_win_over_the_file(tmp_path, monkeypatch):
    opts = _options(tmp_path, FILE, "--listen", "127.0.0.1:7000", "--retention", "2d",
                    "--no-metrics-public", "--device-rate", "0", "--state-dir", "/elsewhere",
                    "--broker", "mqtts://other:8883", monkeypatch=monkeypatch)
    assert (opts.listen, opts.retention_s, opts.metrics_public) == ("127.0.0.1:7000",
                                                                    2 * DAY, False)
    assert (opts.device_rate_per_s, opts.state_dir, opts.broker_url) == (
        0.0, Path("/elsewhere"), "mqtts://other:8883")
    # What the command line left alone still comes from the file.
    assert (opts.prefix, opts.device_burst, opts.retention_check_s) == ("plant", 50.0, 600.0)

    # The environment variables the options default to win over the file too.
    opts = _options(tmp_path, FILE, env={"PRUNEFLEET_RETENTION": "3d",
                                         "PRUNEFLEET_SHARE_GROUP": "f" * 32},
                    monkeypatch=monkeypatch)
    assert (opts.retention_s, opts.share_group) == (3 * DAY, "f" * 32)
    # … and the option over the environment.
    opts = _options(tmp_path, FILE, "--retention", "1d", env={"PRUNEFLEET_RETENTION": "3d"},
                    monkeypatch=monkeypatch)
    assert opts.retention_s == DAY


def test_durations_take_units_or_seconds(tmp_path):
    path = tmp_path / "s.toml"
    for text, seconds in (('"45s"', 45.0), ('"90m"', 5400.0), ('"12h"', 43200.0),
                          ('"2w"', 14 * DAY), ("3600", 3600.0), ("1.5", 1.5)):
        path.write_text(f"[retention]\nolder_than = {text}\n")
        assert load_server_config(path).retention.older_than == seconds, text


@pytest.mark.parametrize(("toml", "words"), [
    ('[retention]\nolder_than = "soon"\n', ["retention.older_than", "'soon' is not a duration",
                                            "30s"]),
    ('[retention]\nolder_than = "0d"\n', ["retention.older_than", "greater than 0"]),
    ('[retention]\nolder_than = true\n', ["retention.older_than", "duration"]),
    ('[retention]\ncheck_every = "-1h"\n', ["retention.check_every", "not a duration"]),
    ('[retention]\nolder_then = "30d"\n', ["retention.older_then", "unknown setting",
                                           "older_than, check_every"]),
    ('retention = "30d"\n', ["retention: expected a table, e.g. [retention]"]),
    ('older_than = "30d"\n', ["older_than", "belongs in the [retention] table"]),
    ('brokr = "mqtt://b:1883"\n', ["brokr", "unknown setting", "broker"]),
    ('listen = "8080"\n', ["listen", "'8080' is not HOST:PORT"]),
    ('prefix = "a/+"\n', ["prefix", "invalid fleet prefix"]),
    ('share_group = "short"\n', ["share_group", "16 characters"]),
    ('client_id = "no spaces"\n', ["client_id", "invalid client id"]),
    ("device_burst = 0\n", ["device_burst", "greater than or equal to 1"]),
    ("device_rate_per_s = -1\n", ["device_rate_per_s", "greater than or equal to 0"]),
    ('broker = "http://admin:hunter2@broker"\n', ["broker", "expected mqtt://host:port"]),
    ("retention = [\n", ["not valid TOML"]),
])
def test_a_bad_file_is_one_line_and_starts_nothing(tmp_path, capsys, toml, words):
    path = tmp_path / "server.toml"
    path.write_text(toml)
    state = tmp_path / "srv"
    # Were the file taken, serve would start: a state directory, a broker connection.
    rc = main(["serve", "--config", str(path), "--state-dir", str(state),
               "--keys", str(tmp_path / "keys"), "--listen", "127.0.0.1:0",
               "--broker", f"mqtt://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"prunefleet: {path}: ")
    for w in words:
        assert w in line, (w, line)
    assert "hunter2" not in line and "validation error" not in line
    assert not state.exists() and not (tmp_path / "keys").exists()


def test_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ServerConfigError, match="no such config file"):
        load_server_config(missing)
    assert main(["serve", "--config", str(missing), "--state-dir", str(tmp_path / "srv")]) == 2
    assert capsys.readouterr().err.strip() == f"prunefleet: {missing}: no such config file"
    assert not (tmp_path / "srv").exists()


def test_a_bad_retention_option_is_refused(tmp_path, capsys):
    for value, words in (("soon", "not a duration"), ("0", "not more than 0")):
        assert main(["serve", "--retention", value, "--state-dir", str(tmp_path / "s")]) == 2
        line = capsys.readouterr().err.strip()
        assert line.startswith("prunefleet: --retention:") and words in line, line
    assert not (tmp_path / "s").exists()


def _batch(device_id: str, seq: int, end: float) -> TelemetryBatch:
    return TelemetryBatch(device_id=device_id, seq=seq, interval_start=end - 60,
                          interval_end=end, battery_percent=50.0)


@pytest.mark.timeout(90)
def test_serve_with_a_config_file_prunes_old_telemetry(tmp_path, mosquitto):
    """The real command: its file's [retention] deletes what is older than ``older_than``,
    keeps the rest; ``--listen`` on the command line wins over the file's."""
    db = tmp_path / "fleet.db"
    now = time.time()
    store = Store(sqlite_url(db))
    for seq, end in enumerate((now - 3 * DAY, now - 2 * DAY, now - 60)):
        assert store.add_telemetry(_batch("dev-0", seq, end))
    assert store.telemetry_count("dev-0") == 3

    file_port, port = free_port(), free_port()
    config = tmp_path / "server.toml"
    config.write_text(f"""
broker = "{mosquitto.url}"
db = "{sqlite_url(db)}"
state_dir = "{tmp_path / 'srv'}"
keys = "{tmp_path / 'keys'}"
listen = "127.0.0.1:{file_port}"
prefix = "t{uuid.uuid4().hex[:10]}"

[retention]
older_than = "1d"
check_every = "1h"
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunefleet.server.cli", "serve", "--config", str(config),
         "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # The job runs once right after the start, then every hour.
        wait_for(lambda: store.telemetry_count("dev-0") == 1, 30,
                 what="the retention job to delete the two old batches", procs=[proc])
        assert store.telemetry_seqs("dev-0") == [2]  # the fresh one stays
        assert wait_for_port("127.0.0.1", port, 10)
        token = (tmp_path / "srv" / "api-token").read_text().strip()
        assert AdminClient(f"http://127.0.0.1:{port}", token).health()["broker_connected"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        store.close()
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"API http://127.0.0.1:{port}" in text
    assert "retention: telemetry and events older than 1d are deleted every 1h" in text
