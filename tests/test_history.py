"""Fleet history: telemetry bucketed by the database (SQLite and PostgreSQL) matches the
stored rows; the device list searches, filters and pages in one query; the HTTP routes
answer JSON, CSV and JSON lines and refuse ranges past their bounds."""

from __future__ import annotations

import csv
import io
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from history_data import (
    DEVICES,
    expected_device,
    expected_fleet,
    write_history,
)
from rollout_helpers import Fleet, pg_schema_url

from prunefleet.server.history import (
    MAX_BUCKETS,
    device_history,
    device_page,
    fleet_series,
    parse_range,
)
from prunefleet.server.store import Store, sqlite_url

NOW = 1_750_000_000.0


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def history(request, tmp_path_factory):
    gen = pg_schema_url() if request.param == "postgresql" else None
    url = next(gen) if gen else sqlite_url(tmp_path_factory.mktemp("history") / "fleet.db")
    store = Store(url)
    try:
        yield store, write_history(store, NOW)
    finally:
        store.close()
        if gen:
            gen.close()


def test_device_buckets_match_the_stored_batches(history):
    store, h = history
    r = parse_range("1h", None, "60", now=NOW)
    got = device_history(store, "site-000", r)
    want = expected_device(store, "site-000", r.since, r.until, r.resolution_s)
    assert [b.t for b in got.buckets] == sorted(want)
    for b in got.buckets:
        w = want[b.t]
        assert (b.battery_percent, b.cpu_percent, b.temperature_c, b.active_variant) == (
            w["battery_percent"], w["cpu_percent"], w["temperature_c"], w["active_variant"])
        assert b.requests == w["requests"] and b.latency_ms_p95 == w["p95"]
        assert b.latency_ms_p50 == pytest.approx(w["p50"])
        assert b.shadow_variants == w["shadow"]
        assert b.shadow_agreement == (w["shadow"]["small"] if w["shadow"] else None)
    assert [(s.ts, s.from_variant, s.to_variant, s.reason) for s in got.switches] == \
        h.switches("site-000")
    assert sum(b.switches for b in got.buckets) == 3
    assert sum(b.shadow_agreement is not None for b in got.buckets) == 20
    # Without shadow evaluation the field stays empty, not zero.
    assert all(b.shadow_agreement is None and b.shadow_samples == 0
               for b in device_history(store, "site-001", r).buckets)


def test_coarse_buckets_average_and_sum(history):
    store, h = history
    r = parse_range("24h", None, "1h", now=NOW)
    got = {b.t: b for b in device_history(store, "site-001", r).buckets}
    mine = [b for b in h.batches if b.device_id == "site-001"]
    for t, b in got.items():
        inside = [x for x in mine if t <= x.interval_end < t + 3600]
        assert b.batches == len(inside)
        assert b.battery_percent == pytest.approx(
            sum(x.battery_percent for x in inside) / len(inside))
        assert b.energy_j == pytest.approx(sum(x.energy_j for x in inside))
        assert b.requests == sum(v.requests for x in inside for v in x.variants.values())
        assert b.active_variant == max(inside, key=lambda x: x.interval_end).active_variant
    assert sum(b.batches for b in got.values()) == len(
        [x for x in mine if r.since <= x.interval_end < r.until])


def test_fleet_series_match_the_stored_rows(history):
    store, h = history
    r = parse_range("24h", None, None, now=NOW)
    assert r.resolution_s == 600  # the default: at most 240 buckets
    got = fleet_series(store, r)
    want = expected_fleet(store, r.since, r.until, r.resolution_s)
    assert {b.t for b in got.buckets} == want["buckets"]
    for b in got.buckets:
        for v, n in b.requests.items():
            assert n == want["requests"][(v, b.t)]
        for v, e in b.energy_j.items():
            assert e == pytest.approx(want["energy"][(v, b.t)])
        assert b.devices_online == want["online"][("online", b.t)]
        for reason, n in b.switches.items():
            assert n == want["switches"][(reason, b.t)]
    assert sum(n for b in got.buckets for n in b.switches.values()) == 4
    assert got.variants == ["big", "small"]
    (ro,) = got.rollouts
    assert (ro.id, ro.status, ro.total) == (h.rollout_id, "completed", 30)
    assert (ro.points[-1].succeeded, ro.points[-1].failed) == (27, 3)
    assert ro.points[0].succeeded == 0  # it starts from nothing, within the day
    assert [p.t for p in ro.points] == sorted(p.t for p in ro.points)


def test_device_page_searches_filters_and_pages(history):
    store, _ = history
    total, page = device_page(store, limit=25, offset=50)
    assert total == 60 and [d.device_id for d, _, _ in page] == DEVICES[50:]
    total, page = device_page(store, q="SITE-01", limit=5)
    assert total == 10 and [d.device_id for d, _, _ in page] == DEVICES[10:15]
    total, page = device_page(store, group="south", online=False)
    assert total == len([i for i in range(30, 60) if i % 4 == 3])
    assert all(groups == ["south"] and not d.online for d, _, groups in page)
    total, page = device_page(store, q="small", group="north", limit=100)
    # An offline device reported no variant: only online odd ones serve "small".
    small = {DEVICES[i] for i in range(1, 30, 2) if i % 4 != 3}
    assert {d.device_id for d, _, _ in page} == small and total == len(small)
    _, page = device_page(store, q="site-000")
    (_, report, groups), = page
    assert report.phase == "active" and groups == ["north"]
    assert device_page(store, q="%") == (0, [])  # LIKE wildcards are searched as text
    assert device_page(store, offset=100) == (60, [])


def test_ranges_are_bounded():
    assert parse_range("7d", None, None, now=NOW).resolution_s == 3600
    assert parse_range("1h", None, None, now=NOW).resolution_s == 30
    r = parse_range(str(NOW - 95), str(NOW), "1m", now=NOW)
    assert r.since == math.floor((NOW - 95) / 60) * 60 and r.count == 2  # 100 s
    with pytest.raises(ValueError, match="at most 1000"):
        parse_range("7d", None, "60", now=NOW)
    with pytest.raises(ValueError, match="longer than 31 days"):
        parse_range("40d", None, None, now=NOW)
    with pytest.raises(ValueError, match="before until"):
        parse_range("now", "1h", None, now=NOW)
    with pytest.raises(ValueError, match="not a duration"):
        parse_range("1h", None, "fast", now=NOW)
    with pytest.raises(ValueError, match="between 1 s and 1 d"):
        parse_range("1h", None, "2d", now=NOW)
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(ValueError, match="not a time"):
            parse_range(bad, None, None, now=NOW)
    assert parse_range("2025-06-15T00:00:00Z", "2025-06-15T01:00:00Z", "1m").count == 60
    assert MAX_BUCKETS == 1000


# -- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, mosquitto):
    f = Fleet(tmp_path_factory.mktemp("history-api"), mosquitto.url)
    f.start_server()
    try:
        yield f, write_history(f.svc.store, time.time())
    finally:
        f.close()


def _get(f: Fleet, path: str, **query) -> tuple[int, dict, bytes]:
    url = f.svc.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {f.svc.token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_device_telemetry_over_http_and_its_exports(served):
    f, h = served
    span = {"since": str(h.now - 3600), "until": str(h.now + 1), "resolution": "1m"}
    status, _, body = _get(f, "/v1/devices/site-000/telemetry", **span)
    assert status == 200
    doc = json.loads(body)
    assert doc["resolution_s"] == 60 and len(doc["buckets"]) == 55
    assert [s["ts"] for s in doc["switches"]] == [s[0] for s in h.switches("site-000")]
    status, headers, body = _get(f, "/v1/devices/site-000/telemetry", **span, format="csv")
    assert status == 200 and headers["content-type"].startswith("text/csv")
    assert 'filename="site-000-telemetry.csv"' in headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [float(r["battery_percent"]) for r in rows] == [
        b["battery_percent"] for b in doc["buckets"]]
    assert rows[0]["shadow_agreement"] == "" and rows[0]["time_utc"].endswith("Z")
    assert [float(r["shadow_agreement"]) for r in rows if r["shadow_agreement"]] == [
        b["shadow_agreement"] for b in doc["buckets"] if b["shadow_agreement"] is not None]
    status, headers, body = _get(f, "/v1/devices/site-000/telemetry", **span,
                                 format="jsonl")
    lines = [json.loads(x) for x in body.decode().splitlines()]
    assert [x["kind"] for x in lines] == ["bucket"] * 55 + ["switch"] * 3
    assert lines[0]["t"] == doc["buckets"][0]["t"]


def test_history_routes_refuse_what_they_cannot_answer(served):
    f, _ = served
    status, _, body = _get(f, "/v1/devices/site-000/telemetry", since="7d", resolution="10s")
    assert status == 422 and "at most 1000" in json.loads(body)["error"]["message"]
    assert _get(f, "/v1/devices/nobody/telemetry")[0] == 404
    assert _get(f, "/v1/fleet/series", since="yesterday")[0] == 422
    assert _get(f, "/v1/devices/site-000/telemetry", format="xml")[0] == 422
    req = urllib.request.Request(f.svc.url + "/v1/fleet/series")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 401


def test_fleet_series_and_device_pages_over_http(served):
    f, _ = served
    status, _, body = _get(f, "/v1/fleet/series", since="24h")
    doc = json.loads(body)
    assert status == 200 and doc["resolution_s"] == 600
    assert sum(sum(b["switches"].values()) for b in doc["buckets"]) == 4
    assert doc["rollouts"][0]["points"][-1] == {**doc["rollouts"][0]["points"][-1],
                                                "succeeded": 27, "failed": 3}
    status, headers, body = _get(f, "/v1/devices", limit=20, offset=40)
    assert status == 200 and headers["x-total-count"] == "60"
    assert [d["device_id"] for d in json.loads(body)] == DEVICES[40:]
    _, headers, body = _get(f, "/v1/devices", q="site-00", online="false")
    assert headers["x-total-count"] == "2"
    assert [d["device_id"] for d in json.loads(body)] == ["site-003", "site-007"]
    _, headers, body = _get(f, "/v1/devices")  # no paging asked: every device, as before
    assert len(json.loads(body)) == 60
    assert _get(f, "/v1/devices", limit=5000)[0] == 422


def test_devices_show_prints_the_history_and_exports_it(served, capsys, monkeypatch):
    from prunefleet.server import cli

    f, h = served
    monkeypatch.setenv("PRUNEFLEET_SERVER", f.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", f.svc.token)
    span = ["--since", "1h", "--resolution", "1m"]
    assert cli.main(["devices", "show", "site-000", *span]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("site-000: 55 buckets of 60 s")
    assert lines[1].split()[:3] == ["time", "batt%", "cpu%"]
    # one row per bucket, then every switch with its reason
    switches = h.switches("site-000")
    assert out.count(" → ") == len(switches) == 3
    for _, _, to, reason in switches:
        assert f"→ {to}  ({reason})" in out
    assert cli.main(["devices", "show", "site-000", *span, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["buckets"]) == 55
    assert cli.main(["devices", "show", "site-000", *span, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [float(r["battery_percent"]) for r in rows] == [
        b["battery_percent"] for b in doc["buckets"]]
    # a device the server does not know: one line, exit 1
    assert cli.main(["devices", "show", "site-999", *span]) == 1
    assert "no device 'site-999'" in capsys.readouterr().err
