"""The dashboard page of a real ``serve``, rendered by headless Chromium: it lists the
devices, variants and online count, shows device-provided strings as text, asks for a
token when it has none or a wrong one, and needs nothing from the internet.

With a day of history in the store (``history_data``), driven through chromedriver: the
fleet and device charts draw points whose values and positions match the stored
telemetry, switches are markers at their times, the device table searches and pages, and
each page's screenshot is kept (``$PRUNEFLEET_SCREENSHOTS``, default
``test-artifacts/screenshots/``)."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest
from fleet_helpers import wait_for
from history_data import DEVICES, expected_device, expected_fleet, write_history
from rollout_helpers import Fleet
from test_metrics import FakeDevices
from webdriver import Browser, chromium

from prunefleet.shared.messages import ReportedState

AGENTS = ["dash-agent-0", "dash-agent-1"]
XSS = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'
OFFLINE = "dash-offline-1"
REPO = Path(__file__).resolve().parent.parent
SHOTS = Path(os.environ.get("PRUNEFLEET_SCREENSHOTS")
             or REPO / "test-artifacts" / "screenshots")
SVG_NS = "http://www.w3.org/2000/svg"  # a namespace name in charts.js, never fetched


def render(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM after the page ran for 8 s of virtual time."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update",
           "--no-first-run", "--disable-sync", f"--user-data-dir={profile}",
           "--virtual-time-budget=8000", "--window-size=1400,900"]
    cmd += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    r = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": str(profile)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def served(tmp_path_factory, mosquitto):
    tmp = tmp_path_factory.mktemp("dashboard")
    f = Fleet(tmp, mosquitto.url)
    f.start_server()
    fake = FakeDevices(mosquitto.url, f.prefix)
    try:
        f.serve_two_variants(AGENTS, requests=5)
        fake.report("dash-evil", active_variant="small", last_error=XSS)
        fake.publish(fake.topics.reported(OFFLINE),
                     ReportedState(device_id=OFFLINE, online=False).encode(), retain=True)
        wait_for(lambda: {d.device_id for d in f.svc.store.devices()}
                 >= {*AGENTS, "dash-evil", OFFLINE}, 10, what="every device known")
        wait_for(lambda: f.svc.store.telemetry_summary()["variants"].get("small", {})
                 .get("requests", 0) + f.svc.store.telemetry_summary()["variants"]
                 .get("big", {}).get("requests", 0) >= 10, 15, what="requests stored")
        yield f, tmp
    finally:
        fake.close()
        f.close()


def test_page_lists_devices_variants_and_online_count(served):
    f, tmp = served
    dom = render(f"{f.svc.url}/dashboard#token={f.svc.token}", tmp / "profile-1")
    for d in (*AGENTS, "dash-evil", OFFLINE):
        assert f'data-device="{d}"' in dom, d
    online = sum(d.online for d in f.svc.store.devices())
    assert online == 3
    assert f"4 devices: {online} online, 1 offline" in dom
    for v in ("small", "big"):
        assert f'<tr data-variant="{v}"><td>{v}</td>' in dom, v
    # Whichever variant the agents' policy chose served the requests.
    served = f.svc.store.telemetry_summary()["variants"]
    name, stats = max(served.items(), key=lambda kv: kv[1]["requests"])
    assert f'<td>small</td><td class="num">{8 * 64 + 80:,}</td>' in dom
    assert f'<tr data-variant="{name}">' in dom
    assert f'<td class="num">{stats["requests"]}</td>' in dom
    assert "completed" in dom  # the rollout
    assert "cannot reach the server" not in dom
    assert 'id="token-form" hidden' in dom
    assert f.svc.token not in dom


def test_device_strings_are_rendered_as_text(served):
    f, tmp = served
    dom = render(f"{f.svc.url}/dashboard#token={f.svc.token}", tmp / "profile-2")
    # The serialised DOM escapes text: the payload is there, as characters, not elements.
    assert html.escape(XSS, quote=False) in dom
    assert "<img" not in dom and "pwned</script>" not in dom
    assert "<title>prunefleet</title>" in dom


def test_page_without_or_with_a_wrong_token_asks_for_one(served):
    f, tmp = served
    dom = render(f"{f.svc.url}/dashboard", tmp / "profile-3")
    assert 'id="token-form"' in dom and 'id="token-form" hidden' not in dom
    assert 'id="content" hidden' in dom and "dash-agent-0" not in dom
    dom = render(f"{f.svc.url}/dashboard#token=wrong-token-of-some-length", tmp / "profile-4")
    assert "The server refused that token." in dom and "dash-agent-0" not in dom


def test_page_is_self_contained_and_shipped_in_the_package(served):
    f, tmp = served
    with urllib.request.urlopen(f"{f.svc.url}/dashboard", timeout=10) as r:
        page = r.read().decode()
        csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "http:" not in page and "https:" not in page
    static = resources.files("prunefleet.server") / "static"
    for name in ("dashboard.html", "dashboard.css", "dashboard.js", "charts.js", "favicon.svg"):
        text = (static / name).read_text().replace(SVG_NS, "")
        assert "https://" not in text and "http://" not in text, name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text, name
    # Only the page's own files are served.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{f.svc.url}/dashboard/static/..%2Fapi.py", timeout=10)
    assert e.value.code == 404

    with urllib.request.urlopen(f"{f.svc.url}/dashboard/static/charts.js", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/javascript")

    shot = tmp / "dashboard.png"
    render(f"{f.svc.url}/dashboard#token={f.svc.token}", tmp / "profile-5", screenshot=shot)
    assert shot.stat().st_size > 10_000
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SHOTS / "fleet-live-agents.png")


# -- charts, the device page, search and paging, over a day of stored history -----------------
# What a chart drew: its scale (svg data-*), and each point, bar, band and marker.
READ_CHART = """
const svg = document.querySelector("#" + arguments[0] + " svg");
if (!svg) return null;
const num = (e, k) => Number(e.getAttribute(k));
return {
  scale: Object.fromEntries(Object.entries(svg.dataset).map(([k, v]) => [k, Number(v)])),
  points: [...svg.querySelectorAll("circle.pt")].map((c) => ({s: c.dataset.series,
    t: Number(c.dataset.t), v: Number(c.dataset.v), x: num(c, "cx"), y: num(c, "cy")})),
  bars: [...svg.querySelectorAll("rect.bar")].map((r) => ({s: r.dataset.series,
    t: Number(r.dataset.t), v: Number(r.dataset.v), x: num(r, "x")})),
  bands: [...svg.querySelectorAll("rect.band")].map((r) => ({s: r.dataset.variant,
    t0: Number(r.dataset.t0), t1: Number(r.dataset.t1)})),
  markers: [...svg.querySelectorAll("line.marker")].map((m) => ({t: Number(m.dataset.t),
    reason: m.dataset.reason, to: m.dataset.to, x: num(m, "x1")})),
  text: svg.textContent,
};
"""


def x_of(scale: dict, t: float) -> float:
    return scale["plotLeft"] + (t - scale["x0"]) / (scale["x1"] - scale["x0"]) * scale["plotWidth"]


def y_of(scale: dict, v: float) -> float:
    return scale["plotTop"] + scale["plotHeight"] - (
        (v - scale["y0"]) / (scale["y1"] - scale["y0"]) * scale["plotHeight"])


def assert_drawn_at_value(chart: dict) -> None:
    """Each point sits where its value and time say, on the chart's own axes."""
    sc = chart["scale"]
    for p in chart["points"]:
        assert p["x"] == pytest.approx(x_of(sc, p["t"]), abs=0.01), p
        assert p["y"] == pytest.approx(y_of(sc, p["v"]), abs=0.01), p
    for m in chart["markers"]:
        assert m["x"] == pytest.approx(x_of(sc, m["t"]), abs=0.01), m


@pytest.fixture(scope="module")
def history(tmp_path_factory, mosquitto):
    tmp = tmp_path_factory.mktemp("dashboard-history")
    f = Fleet(tmp, mosquitto.url)
    f.start_server()
    browser = None
    try:
        h = write_history(f.svc.store, time.time())
        browser = Browser(tmp / "profile", width=1440, height=1000)
        yield f, h, browser
    finally:
        if browser is not None:
            browser.close()
        f.close()


def show(browser: Browser, f: Fleet, fragment: str, loaded: str, range_: str) -> None:
    browser.open(f"{f.svc.url}/dashboard#token={f.svc.token}&{fragment}")
    browser.wait("return document.body.dataset.loaded === arguments[0]"
                 " && document.body.dataset.range === arguments[1]", loaded, range_,
                 what=f"the page showing {loaded} over {range_}")


def chart(browser: Browser, figure: str) -> dict:
    c = browser.run(READ_CHART, figure)
    assert c is not None, figure
    return c


def test_fleet_charts_draw_the_stored_telemetry(history):
    f, _, browser = history
    show(browser, f, "range=1h", "fleet", "1h")
    req = chart(browser, "chart-requests")
    sc = req["scale"]
    assert sc["step"] == 30 and sc["x1"] - sc["x0"] >= 3600
    want = expected_fleet(f.svc.store, sc["x0"], sc["x1"], sc["step"])
    drawn = {(p["s"], p["t"]): p["v"] for p in req["points"]}
    # Every bucket with requests is drawn with its value; others at 0 (no gap invented).
    assert {k for k, v in drawn.items() if v} == set(want["requests"])
    for k, v in drawn.items():
        assert v == want["requests"].get(k, 0), k
    assert len(drawn) == 2 * 55  # big and small, one point per minute with telemetry
    assert_drawn_at_value(req)

    energy = chart(browser, "chart-energy")
    for p in energy["points"]:
        assert p["v"] == pytest.approx(want["energy"].get((p["s"], p["t"]), 0), abs=1e-9)
    assert_drawn_at_value(energy)
    online = chart(browser, "chart-online")
    assert {(p["s"], p["t"]): p["v"] for p in online["points"]} == want["online"]
    assert {p["v"] for p in online["points"]} == {3}
    switches = chart(browser, "chart-switches")
    assert {(b["s"], b["t"]): b["v"] for b in switches["bars"]} == want["switches"]
    assert sorted(b["s"] for b in switches["bars"]) == [
        "battery_low", "charging", "complexity_high"]
    rollouts = chart(browser, "chart-rollouts")
    # The only rollout completed before this hour.
    assert rollouts["points"] == [] and "no rollout in this range" in rollouts["text"]

    tiles = browser.run("return Object.fromEntries([...document.querySelectorAll('.tile')]"
                        ".map((t) => [t.dataset.tile, t.querySelector('.tile-value')"
                        ".textContent]))")
    assert tiles["devices"] == "60" and tiles["online"] == "45"
    assert tiles["switches"] == "3"
    assert tiles["requests"] == f"{sum(want['requests'].values()):,.0f}"
    # Above the fold: the summary tiles and the first row of charts; the table after them.
    fold = browser.run("""
        const r = (id) => document.getElementById(id).getBoundingClientRect();
        return {h: window.innerHeight, tiles: r('tiles').bottom,
                chart: r('chart-requests').bottom, charts: r('chart-rollouts').bottom,
                table: r('devices').top};""")
    assert fold["tiles"] < fold["chart"] <= fold["h"], fold
    assert fold["charts"] < fold["table"], fold
    assert browser.console_errors() == []
    browser.screenshot(SHOTS / "fleet-1h.png")
    browser.screenshot(SHOTS / "fleet-1h-full.png", full_page=True)

    # The range selector: the day, at 10-minute buckets.
    browser.click('.range button[data-range="24h"]')
    browser.wait("return document.body.dataset.range === '24h'", what="the 24 h range")
    req = browser.wait("""const c = document.querySelector('#chart-requests svg');
                          return c && c.dataset.step === '600' && c;""", what="600 s buckets")
    req = chart(browser, "chart-requests")
    sc = req["scale"]
    want = expected_fleet(f.svc.store, sc["x0"], sc["x1"], sc["step"])
    drawn = {(p["s"], p["t"]): p["v"] for p in req["points"]}
    assert {k for k, v in drawn.items() if v} == set(want["requests"])
    for k, v in drawn.items():
        assert v == want["requests"].get(k, 0), k
    assert_drawn_at_value(req)
    rollouts = chart(browser, "chart-rollouts")
    # Within the day it went from none to 27 of its 30 devices (3 failed).
    assert {p["s"] for p in rollouts["points"]} == {f"#{history[1].rollout_id}"}
    x0, step = rollouts["scale"]["x0"], rollouts["scale"]["step"]
    devices = f.svc.store.rollout_devices(history[1].rollout_id)
    ok = [d.updated_at for d in devices if d.phase == "active"]
    created = f.svc.store.rollout(history[1].rollout_id).created_at
    failed = [d.updated_at for d in devices if d.phase == "failed"]
    starts = sorted({x0 + (t - x0) // step * step for t in [*ok, *failed, created]})
    assert [(p["t"], p["v"]) for p in rollouts["points"]] == [
        (t, pytest.approx(100 * sum(u < t + step for u in ok) / len(devices)))
        for t in starts]
    assert rollouts["points"][-1]["v"] == 90
    assert_drawn_at_value(rollouts)
    browser.screenshot(SHOTS / "fleet-24h.png")


def test_device_page_draws_its_telemetry_and_switch_markers(history):
    f, h, browser = history
    show(browser, f, "device=site-000&range=1h", "device:site-000", "1h")
    battery = chart(browser, "dev-battery")
    sc = battery["scale"]
    want = expected_device(f.svc.store, "site-000", sc["x0"], sc["x1"], sc["step"])
    assert len(want) == 55
    for figure, field, series in (
        ("dev-battery", "battery_percent", "battery_percent"),
        ("dev-cpu", "cpu_percent", "cpu_percent"),
        ("dev-temperature", "temperature_c", "temperature_c"),
        ("dev-requests", "requests", "requests"),
        ("dev-latency", "p95", "latency_ms_p95"),
        ("dev-latency", "p50", "latency_ms_p50"),
    ):
        c = chart(browser, figure)
        drawn = {p["t"]: p["v"] for p in c["points"] if p["s"] == series}
        assert drawn.keys() == want.keys(), figure
        for t, v in drawn.items():
            assert v == pytest.approx(want[t][field]), (figure, t)
        assert_drawn_at_value(c)

    # The switches: a marker at each stored time, with its reason, on every chart.
    stored = h.switches("site-000")
    for figure in ("dev-variant", "dev-battery", "dev-latency"):
        c = chart(browser, figure)
        assert [(m["t"], m["to"], m["reason"]) for m in c["markers"]] == [
            (ts, to, reason) for ts, _, to, reason in stored], figure
        assert_drawn_at_value(c)
    # The active variant as a band: each bucket lies in a band of the variant it reported.
    bands = chart(browser, "dev-variant")["bands"]
    assert [b["s"] for b in bands] == ["big", "small", "big", "small"]
    for t, w in want.items():
        (band,) = [b for b in bands if b["t0"] <= t < b["t1"]]
        assert band["s"] == w["active_variant"], t
    rows = browser.run("return [...document.querySelectorAll('#device-switches tbody tr')]"
                       ".map((r) => [Number(r.dataset.ts), r.cells[3].textContent])")
    assert rows == [[ts, reason] for ts, _, _, reason in reversed(stored)]
    # Shadow agreement of "small" against the reference, for the last 20 minutes.
    shadow = chart(browser, "dev-shadow")
    drawn = {p["t"]: p["v"] for p in shadow["points"] if p["s"] == "small"}
    assert len(drawn) == 20 and drawn == {
        t: pytest.approx(100 * w["shadow"]["small"]) for t, w in want.items() if w["shadow"]}
    assert_drawn_at_value(shadow)
    facts = browser.run("return Object.fromEntries([...document.querySelectorAll("
                        "'#device-facts dd')].map((d) => [d.dataset.fact, d.textContent]))")
    assert facts["state"] == "online" and facts["groups"] == "north"
    assert browser.console_errors() == []
    browser.screenshot(SHOTS / "device-site-000-1h.png")
    browser.screenshot(SHOTS / "device-site-000-1h-full.png", full_page=True)


def test_device_table_searches_filters_and_pages(history):
    f, _, browser = history
    show(browser, f, "range=24h", "fleet", "24h")

    def table() -> tuple[str, list[str]]:
        return tuple(browser.run(
            "return [document.getElementById('page-info').textContent,"
            " [...document.querySelectorAll('#devices tbody tr[data-device]')]"
            ".map((r) => r.dataset.device)]"))

    def wait_table(info: str) -> list[str]:
        info = info.replace("-", "\N{EN DASH}", 1) if info[0].isdigit() else info
        browser.wait("return document.getElementById('page-info').textContent === arguments[0]",
                     info, what=f"page info {info!r}")
        return table()[1]

    assert wait_table("1-50 of 60") == DEVICES[:50]
    browser.click("#page-next")
    assert wait_table("51-60 of 60") == DEVICES[50:]
    assert browser.run("return document.getElementById('page-next').disabled") is True
    browser.type("#device-search", "site-01")
    assert wait_table("1-10 of 10") == DEVICES[10:20]  # a new search starts at page 1
    browser.type("#device-search", "")
    browser.type("#device-group", "north")
    browser.click('#device-online option[value="false"]')
    offline_north = [d for i, d in enumerate(DEVICES) if i < 30 and i % 4 == 3]
    assert wait_table(f"1-{len(offline_north)} of {len(offline_north)}") == offline_north
    browser.type("#device-search", "site-002")
    assert wait_table("no device matches") == []  # site-002 is online: the filter holds
    assert "no device matches these filters" in browser.run(
        "return document.querySelector('#devices tbody').textContent")
    browser.click('#device-online option[value=""]')
    assert wait_table("1-1 of 1") == ["site-002"]
    browser.click('#devices a')  # the device's own page
    browser.wait("return document.body.dataset.loaded === 'device:site-002'",
                 what="the device page")
    assert browser.run("return document.getElementById('device-title').textContent") == \
        "site-002"
    # No shadow evaluation stored for it: the chart says so rather than drawing zeros.
    shadow = chart(browser, "dev-shadow")
    assert shadow["points"] == [] and "no shadow evaluation in this range" in shadow["text"]
    assert browser.console_errors() == []
