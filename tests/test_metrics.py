"""Prometheus ``/metrics`` of a real ``serve`` with agents and many reporting devices:
the families and values, labels from bounded sets only (never a device id), the token,
and the Grafana and Prometheus files in ``deploy/`` against what is exposed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from fleet_helpers import wait_for
from prometheus_client.parser import text_string_to_metric_families
from rollout_helpers import Fleet
from sqlalchemy import func, select

from prunefleet.server.serve import FleetService, ServeOptions
from prunefleet.server.store import VariantUsage
from prunefleet.shared.messages import (
    ReportedState,
    RolloutPhase,
    RolloutReport,
    SwitchEvent,
    TelemetryBatch,
    VariantSpec,
    VariantStats,
)
from prunefleet.shared.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
AGENTS = ["m-agent-0", "m-agent-1"]
REQUESTS_PER_AGENT = 12


class FakeDevices:
    """Devices that are only MQTT messages: reported states and telemetry published on
    the real broker, so the server ingests them as it would a real device's."""

    def __init__(self, broker_url: str, prefix: str):
        host, port = broker_url.removeprefix("mqtt://").rsplit(":", 1)
        self.topics = Topics(prefix)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"fake-{uuid.uuid4().hex[:8]}")
        self.client.connect(host, int(port))
        self.client.loop_start()
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        with self._lock:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def report(self, device_id: str, **fields) -> None:
        state = ReportedState(device_id=device_id, online=True, **fields)
        self.publish(self.topics.reported(device_id), state.encode(), retain=True)

    def telemetry(self, device_id: str, seq: int, t: float, **fields) -> None:
        batch = TelemetryBatch(device_id=device_id, seq=seq, interval_start=t - 1,
                               interval_end=t, **fields)
        self.publish(self.topics.telemetry(device_id), batch.encode())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def scrape(url: str, token: str | None) -> tuple[int, str, str]:
    req = urllib.request.Request(url + "/metrics")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def samples(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for s in samples(text) if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def ghost_ids(start: int, n: int) -> list[str]:
    return [f"ghost-{i:04d}-{uuid.uuid4().hex[:6]}" for i in range(start, start + n)]


def add_ghosts(fake: FakeDevices, ids: list[str], now: float, version: int = 1) -> None:
    """Devices serving ``small`` and a variant the server never registered, downloading
    the desired state ``version`` of the group they ask for (a report on a manifest the
    server never issued to a device would not count)."""
    for i, d in enumerate(ids):
        fake.report(d, active_variant="small" if i % 2 else f"rogue-{d}", group="ghosts",
                    rollout=RolloutReport(manifest_version=version,
                                          phase=RolloutPhase.DOWNLOADING, progress=0.5),
                    counters={"rejected_chunks": 1, f"odd-{i}": 5})
        fake.telemetry(d, 0, now, energy_j=2.0, batches_dropped=1, variants={
            "small": VariantStats(requests=10, labeled=10, correct=9, latency_ms_p50=2.0,
                                  latency_ms_p95=4.0),
            f"rogue-{d}": VariantStats(requests=3),
        }, switches=[SwitchEvent(ts=now - 0.5, from_variant=None, to_variant="small",
                                 reason="battery_low")])


@pytest.fixture(scope="module")
def populated(tmp_path_factory, mosquitto):
    """A served fleet: two in-process agents that installed two variants and served
    labelled requests, and 30 devices that exist only as messages."""
    import time

    f = Fleet(tmp_path_factory.mktemp("metrics"), mosquitto.url)
    f.start_server()
    fake = FakeDevices(mosquitto.url, f.prefix)
    try:
        f.serve_two_variants(AGENTS, requests=REQUESTS_PER_AGENT)
        ghosts = ghost_ids(0, 30)
        small = VariantSpec.model_validate(f.svc.store.variant("small").spec)
        m = f.svc.fleet.deploy("ghosts", [small], group=True)
        add_ghosts(fake, ghosts, time.time(), m.version)
        store = f.svc.store

        def stored_requests() -> int:
            with store.session() as s:
                return int(s.scalar(select(func.sum(VariantUsage.requests))) or 0)

        wait_for(lambda: stored_requests() == 2 * REQUESTS_PER_AGENT + 30 * 13, 20,
                 what="every request in the store")
        wait_for(lambda: len(store.devices()) == 32, 10, what="every device known")
        yield f, fake, ghosts
    finally:
        fake.close()
        f.close()


def test_metrics_expose_fleet_and_variant_aggregates(populated):
    f, _, _ = populated
    status, ctype, text = scrape(f.svc.url, f.svc.token)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    names = {s.name for s in samples(text)}
    for family in (
        "prunefleet_devices", "prunefleet_devices_online", "prunefleet_devices_active_variant",
        "prunefleet_telemetry_batches_ingested_total",
        "prunefleet_telemetry_duplicates_dropped_total",
        "prunefleet_messages_invalid_dropped_total", "prunefleet_variant_requests_total",
        "prunefleet_variant_accuracy_ratio", "prunefleet_variant_latency_seconds",
        "prunefleet_switches_total", "prunefleet_rollouts", "prunefleet_devices_rollout_phase",
        "prunefleet_energy_joules_total", "prunefleet_device_telemetry_batches_dropped_total",
        "prunefleet_store_up", "prunefleet_broker_connected",
    ):
        assert family in names, family

    assert value(text, "prunefleet_devices") == 32
    assert value(text, "prunefleet_store_up") == 1
    online = sum(d.online for d in f.svc.store.devices())
    assert value(text, "prunefleet_devices_online") == online >= 2

    # Requests per variant equal the store's sums; unregistered names fold into "other".
    with f.svc.store.session() as s:
        stored = dict(s.execute(select(VariantUsage.variant, func.sum(VariantUsage.requests))
                                .group_by(VariantUsage.variant)).all())
    expected = {"small": 0, "big": 0, "other": 0}
    for name, n in stored.items():
        expected[name if name in ("small", "big") else "other"] += int(n)
    got = {s.labels["variant"]: s.value for s in samples(text)
           if s.name == "prunefleet_variant_requests_total"}
    assert got == expected
    assert expected["other"] == 90 and sum(got.values()) == 2 * REQUESTS_PER_AGENT + 390

    # The ghosts' labelled requests on "small" were 90% correct; agents add their own.
    acc = value(text, "prunefleet_variant_accuracy_ratio", variant="small")
    assert 0.5 < acc <= 1.0
    p50 = value(text, "prunefleet_variant_latency_seconds", variant="small", quantile="0.5")
    p95 = value(text, "prunefleet_variant_latency_seconds", variant="small", quantile="0.95")
    assert 0 < p50 <= p95 < 1.0

    assert value(text, "prunefleet_switches_total", reason="battery_low") >= 30
    assert value(text, "prunefleet_rollouts", status="completed") == 1
    assert value(text, "prunefleet_rollouts", status="active") == 0
    assert value(text, "prunefleet_devices_rollout_phase", phase="downloading") == 30
    assert value(text, "prunefleet_energy_joules_total") >= 60.0
    assert value(text, "prunefleet_device_telemetry_batches_dropped_total") == 30
    assert value(text, "prunefleet_device_reported_counters", counter="rejected_chunks") >= 30
    assert value(text, "prunefleet_devices_active_variant", variant="other") == 15
    assert value(text, "prunefleet_telemetry_batches_ingested_total") >= 30


def test_no_device_id_in_any_label_and_series_do_not_grow_with_devices(populated):
    f, fake, ghosts = populated
    import time

    _, _, before = scrape(f.svc.url, f.svc.token)
    ids = set(ghosts) | set(AGENTS)
    more = ghost_ids(100, 40)
    add_ghosts(fake, more, time.time())
    wait_for(lambda: len(f.svc.store.devices()) == 72, 20, what="40 more devices known")
    _, _, after = scrape(f.svc.url, f.svc.token)
    assert value(after, "prunefleet_devices") == 72
    for d in ids | set(more):
        assert d not in after, d
    for s in samples(after):
        for v in s.labels.values():
            assert not v.startswith(("ghost-", "m-agent-", "rogue-", "odd-")), s
    label_keys = {k for s in samples(after) for k in s.labels}
    assert label_keys <= {"variant", "reason", "status", "phase", "quantile", "counter", "le"}
    # Same series, however many devices report.
    key = lambda text: {(s.name, tuple(sorted(s.labels.items()))) for s in samples(text)}  # noqa: E731
    assert key(after) == key(before)


def test_metrics_need_the_token_unless_public(populated, tmp_path, mosquitto):
    f, _, _ = populated
    for token in (None, "wrong-token-of-some-length"):
        status, _, body = scrape(f.svc.url, token)
        assert status == 401 and json.loads(body)["error"]["message"] == \
            "missing or wrong bearer token"

    svc = FleetService(ServeOptions(
        state_dir=tmp_path / "public", broker_url=mosquitto.url, listen="127.0.0.1:0",
        prefix=f"t{uuid.uuid4().hex[:10]}", metrics_public=True,
    )).start()
    try:
        status, _, text = scrape(svc.url, None)
        assert status == 200 and value(text, "prunefleet_devices") == 0
        req = urllib.request.Request(svc.url + "/v1/devices")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401  # only /metrics is public
    finally:
        svc.stop()


def test_grafana_dashboard_uses_only_exposed_metrics(populated):
    f, _, _ = populated
    _, _, text = scrape(f.svc.url, f.svc.token)
    exposed = {s.name for s in samples(text)}
    dash = json.loads((ROOT / "deploy/grafana/prunefleet-dashboard.json").read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    used: set[str] = set()
    # A collapsed row holds its panels inside it: check those too.
    every = [*dash["panels"], *(q for p in dash["panels"] for q in p.get("panels", []))]
    panels = [p for p in every if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            names = set(re.findall(r"prunefleet_[a-z0-9_]+", t["expr"]))
            assert names, t["expr"]
            assert names <= exposed, (p["title"], names - exposed)
            used |= names
    # Every family but the stored-batch count has a panel.
    families = {n.removesuffix("_total") for n in exposed}
    assert families - {n.removesuffix("_total") for n in used} <= {
        "prunefleet_variants_registered", "prunefleet_telemetry_batches_stored"}


def test_prometheus_config_scrapes_with_a_bearer_token_file():
    import yaml
    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]


def test_prometheus_config_passes_promtool(tmp_path):
    """Prometheus's own check, with the token file where the config expects one (it refuses
    a credentials file that does not exist). `make deps` installs promtool."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed: `make deps` (Debian package prometheus)"
    text = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    token_file = "/etc/prometheus/prunefleet-token"
    assert token_file in text
    (tmp_path / "token").write_text("t" * 32)
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace(token_file, str(tmp_path / "token")))
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_totals_count_rows_any_replica_stored_and_survive_pruning(tmp_path):
    """The per-variant totals are kept between scrapes: a scrape adds what was stored since
    the last one, also by another server on the same store, and pruning old telemetry does
    not lower a counter; a restarted server rebuilds them from what the store holds."""
    from prunefleet.server.fleet import IngestCounters
    from prunefleet.server.metrics import FleetCollector, make_registry, render
    from prunefleet.server.store import Store, sqlite_url

    url = sqlite_url(tmp_path / "fleet.db")
    mine, other = Store(url), Store(url)
    now = [1_250.0]  # the collector's clock: the accuracy gauge covers the last 300 s
    scrape_mine = make_registry(FleetCollector(mine, IngestCounters, clock=lambda: now[0]))

    def batch(device: str, seq: int, end: float, correct: int = 1) -> TelemetryBatch:
        return TelemetryBatch(
            device_id=device, incarnation="i1", seq=seq, interval_start=end - 10,
            interval_end=end, energy_j=1.5, variants={
                "small": VariantStats(requests=4, labeled=2, correct=correct)},
            switches=[SwitchEvent(ts=end - 1, from_variant=None, to_variant="small",
                                  reason="battery_low")])

    def figures(text: str) -> tuple[float, float, float, float]:
        return (value(text, "prunefleet_variant_requests_total", variant="other"),
                value(text, "prunefleet_switches_total", reason="battery_low"),
                value(text, "prunefleet_energy_joules_total"),
                value(text, "prunefleet_telemetry_batches_stored_total"))

    old = 1_000.0
    mine.add_telemetry_batches([batch("d-1", i, old + i) for i in range(3)])
    assert figures(render(scrape_mine).decode()) == (12, 3, 4.5, 3)
    other.add_telemetry_batches([batch("d-2", i, old + 100 + i) for i in range(2)])
    assert figures(render(scrape_mine).decode()) == (20, 5, 7.5, 5)
    mine.prune_telemetry(before=old + 50)
    mine.add_telemetry_batches([batch("d-1", 3, old + 200, correct=2)])
    text = render(scrape_mine).decode()
    assert figures(text) == (24, 6, 9.0, 6)
    assert value(text, "prunefleet_variant_accuracy_ratio", variant="other") == 7 / 12
    now[0] = old + 450  # the window now holds the last batch only
    text = render(scrape_mine).decode()
    assert value(text, "prunefleet_variant_accuracy_ratio", variant="other") == 1.0
    restarted = make_registry(FleetCollector(Store(url), IngestCounters))
    assert figures(render(restarted).decode()) == (12, 3, 4.5, 3)


def test_a_device_sending_made_up_names_and_future_dates_hides_no_variants_figures(tmp_path):
    """One device with valid credentials sends a thousand made-up variant names and
    batches dated two centuries ahead. A registered variant's figures are still its own
    (the names kept are not used up), and the dated-ahead rows never enter the recent
    window, where each would have held a bucket in memory for good and shown its accuracy
    once the honest rows aged out."""
    from prunefleet.server.fleet import IngestCounters
    from prunefleet.server.metrics import FleetCollector, make_registry, render
    from prunefleet.server.store import Store, sqlite_url

    store = Store(sqlite_url(tmp_path / "fleet.db"))
    store.add_variant("small", "ab" * 32, "x.onnx", {}, {})
    now = [10_000.0]
    collector = FleetCollector(store, IngestCounters, clock=lambda: now[0])
    registry = make_registry(collector)
    far = 2.0**33
    liar = [TelemetryBatch(
        device_id="liar", incarnation=f"i{k}", seq=0, interval_start=far - 10 - k,
        interval_end=far - k, variants={
            **{f"junk-{k}-{j}": VariantStats(requests=1) for j in range(15)},
            "small": VariantStats(requests=1, labeled=1, correct=0)})
        for k in range(70)]
    store.add_telemetry_batches(liar)
    honest = TelemetryBatch(device_id="honest", incarnation="h", seq=0,
                            interval_start=now[0] - 20, interval_end=now[0] - 10,
                            variants={"small": VariantStats(requests=500, labeled=10,
                                                            correct=10)})
    store.add_telemetry_batches([honest])
    text = render(registry).decode()
    assert value(text, "prunefleet_variant_requests_total", variant="small") == 570
    assert value(text, "prunefleet_variant_requests_total", variant="other") == 70 * 15
    assert value(text, "prunefleet_variant_accuracy_ratio", variant="small") == 1.0
    assert len(collector.totals.recent) == 1  # the honest bucket only
    now[0] += 1_000  # the honest rows have left the window
    text = render(registry).decode()
    assert not [s for s in samples(text) if s.name == "prunefleet_variant_accuracy_ratio"
                and s.labels.get("variant") == "small"]
    assert collector.totals.recent == {}
