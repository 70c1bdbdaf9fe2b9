"""The dashboard's views of what devices measured, in headless Chromium: the fleet page's
"Device classes" table (per class its devices, per variant the median and quartiles of
each on-device profile figure with the count behind it, energy sources) shows what
``GET /v1/classes`` says, and a device's page shows its hardware facts and its profile of
each variant as ``GET /v1/devices/{id}/profile`` says, with the active variant and the
profile-only candidates marked. With nothing measured, both say so.

Profiles are seeded the way the server keeps a device's report (``set_reported`` then
``set_measurements``, as ``FleetServer`` does), of variants registered through the API;
one device's desired state (a signed manifest in the store) marks a candidate
profile-only, as ``prunefleet tune`` does. Screenshots go where ``test_dashboard.py``
keeps its own."""

from __future__ import annotations

import time

import pytest
from rollout_helpers import Fleet
from test_dashboard import SHOTS
from webdriver import Browser

from prunefleet.shared.messages import (
    DeviceFacts,
    InstalledVariant,
    Manifest,
    ReportedState,
    VariantProfile,
    VariantSpec,
)
from prunefleet.shared.signing import SigningKey

PI = DeviceFacts(arch="aarch64", cpu_model="Cortex-A72", isa=["neon"], cores=4,
                 memory_mb=3792, ort_version="1.20.1", providers=["CPUExecutionProvider"],
                 device_class="pi4-aarch64", active_power_w=0.9)
X86 = DeviceFacts(arch="x86_64", cpu_model="Intel(R) Core(TM) i5-8365U", isa=["avx2"],
                  cores=8, memory_mb=15842, ort_version="1.20.1", device_class="x86-avx2")
EVIL = '<img src=x onerror="document.title=\'pwned\'">'
LONE = DeviceFacts(arch="armv7l", cpu_model=EVIL, cores=2, device_class="armv7-lone")
# Device → (facts, variant → (p50, p95, cpu ms, memory MB or None, energy mJ, source)).
# No figure (nor median or quartile) sits on a rounding tie at the decimals shown: JS
# rounds a tie up, Python to even.
SEED: dict[str, tuple[DeviceFacts, dict[str, tuple]]] = {
    "pi-0": (PI, {"small": (1.113, 2.017, 1.3, 11.21, 0.91, "hwmon"),
                  "big": (6.271, 9.433, 7.1, 30.52, 4.74, "hwmon"),
                  "cand": (3.052, 4.118, 3.4, 19.87, 2.31, "hwmon")}),
    "pi-1": (PI, {"small": (1.262, 2.311, 1.41, None, 1.02, "cpu_time_estimate"),
                  "big": (6.904, 10.212, 7.72, 31.03, 5.11, "cpu_time_estimate")}),
    "pi-2": (PI, {"small": (1.041, 1.883, 1.22, 10.93, 0.87, "hwmon"),
                  "big": (5.983, 8.871, 6.83, 29.91, 4.52, "hwmon")}),
    "x86-0": (X86, {"small": (0.211, 0.352, 0.24, 12.03, 0.061, "rapl"),
                    "big": (0.913, 1.371, 1.02, 33.71, 0.312, "rapl")}),
    "x86-1": (X86, {"big": (0.871, 1.233, 0.98, 33.12, 0.291, "rapl")}),
    "lone-0": (LONE, {}),
}
PROFILE_ONLY = {"pi-0": "cand"}
ACTIVE = {"pi-0": "small", "pi-1": "big", "pi-2": "small", "x86-0": "small", "x86-1": "big"}


def fmt(x: float | None) -> str:
    """A figure as the page writes it."""
    if x is None:
        return "\N{EN DASH}"
    return f"{x:.3f}" if abs(x) < 1 else f"{x:.2f}" if abs(x) < 1000 else f"{x:,.0f}"


def open_page(browser: Browser, f: Fleet, fragment: str, loaded: str) -> None:
    """A fresh load of the page (not a fragment change on the one already open)."""
    browser.open("about:blank")
    browser.open(f"{f.svc.url}/dashboard#token={f.svc.token}&{fragment}")
    browser.wait("return document.body.dataset.loaded === arguments[0]", loaded,
                 what=f"the page showing {loaded}")


def set_window(browser: Browser, width: int, height: int) -> None:
    # W3C Set Window Rect; webdriver.Browser has no helper for it.
    browser._call("POST", browser._s("/window/rect"), {"width": width, "height": height})


def seed(f: Fleet) -> None:
    store = f.svc.store
    f.register_mlp("small", hidden=8)
    f.register_mlp("big", hidden=32, seed=1)
    f.register_mlp("cand", hidden=16, seed=2)
    specs = {n: VariantSpec.model_validate(store.variant(n).spec)
             for n in ("small", "big", "cand")}
    key = SigningKey.generate()
    now = time.time()
    for i, (device, (facts, profiles)) in enumerate(SEED.items()):
        version = None
        if device in PROFILE_ONLY:  # its desired state holds a candidate to measure only
            version = store.next_manifest_version()
            variants = [specs[n].model_copy(update={"profile_only": n == PROFILE_ONLY[device]})
                        for n in profiles]
            m = Manifest(target=device, version=version, issued_at=now - 60,
                         expires_at=now + 86400, variants=variants)
            store.save_manifest(version, device, key.sign(m).encode().decode())
        r = ReportedState(
            device_id=device, online=True, ts=now, agent_version="0.1.0",
            manifest_version=version, active_variant=ACTIVE.get(device), facts=facts,
            installed=[InstalledVariant(name=n, sha256=specs[n].sha256, size=specs[n].size)
                       for n in profiles],
            profiles={n: VariantProfile(
                sha256=specs[n].sha256, latency_ms_p50=p50, latency_ms_p95=p95, cpu_ms=cpu,
                memory_mb=mem, energy_mj=mj, energy_source=src, runs=50, threads=2,
                ts=now - 600 - 60 * i) for n, (p50, p95, cpu, mem, mj, src) in profiles.items()})
        store.set_reported(r)
        store.set_measurements(r)
    # A device that never reported facts or profiles (an agent of an older release).
    store.set_reported(ReportedState(device_id="bare-0", online=True, active_variant="small"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Browser(tmp_path_factory.mktemp("profiles-browser") / "profile", width=1440,
                height=1000)
    yield b
    b.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, mosquitto):
    f = Fleet(tmp_path_factory.mktemp("dashboard-profiles"), mosquitto.url)
    f.start_server()
    try:
        seed(f)
        yield f
    finally:
        f.close()


READ_CLASSES = """
const cell = (td) => td ? {text: td.textContent,
  median: td.querySelector('.median') && td.querySelector('.median').textContent,
  spread: [...td.querySelectorAll('.spread:not(.n)')].map((s) => s.textContent),
  n: td.querySelector('.n') && td.querySelector('.n').textContent} : null;
return [...document.querySelectorAll('#classes tbody tr')].map((tr) => ({
  cls: tr.dataset.class, variant: tr.dataset.variant || null,
  head: tr.querySelector('td.cls') ? [tr.cells[0].textContent, tr.cells[1].textContent] : null,
  profiled: tr.dataset.variant ? tr.querySelector('td.variant').nextElementSibling.textContent
    : null,
  figures: Object.fromEntries([...tr.querySelectorAll('td[data-field]')].map((td) =>
    [td.dataset.field, cell(td)])),
  sources: [...tr.querySelectorAll('.sources .chip')].map((c) => c.textContent),
  text: tr.textContent,
}));
"""


def test_class_table_shows_what_the_classes_api_says(fleet, browser):
    api = fleet.api.classes()["classes"]
    assert set(api) == {"pi4-aarch64", "x86-avx2", "armv7-lone"}
    open_page(browser, fleet, "range=1h", "fleet")
    rows = browser.run(READ_CLASSES)
    # Most devices first; in a class, the fastest variant (median p95) first.
    assert [(r["cls"], r["variant"]) for r in rows] == [
        ("pi4-aarch64", "small"), ("pi4-aarch64", "cand"), ("pi4-aarch64", "big"),
        ("x86-avx2", "small"), ("x86-avx2", "big"), ("armv7-lone", None)]
    heads = [r["head"] for r in rows if r["head"]]
    assert heads == [[c, str(api[c]["devices"])]
                     for c in ("pi4-aarch64", "x86-avx2", "armv7-lone")]
    assert heads[0] == ["pi4-aarch64", "3"] and heads[1] == ["x86-avx2", "2"]
    for r in rows:
        if r["variant"] is None:
            assert "no profiles yet" in r["text"]
            assert api[r["cls"]]["variants"] == {}
            continue
        want = api[r["cls"]]["variants"][r["variant"]]
        assert r["profiled"] == str(want["devices"])
        for field in ("latency_ms_p95", "latency_ms_p50", "energy_mj", "memory_mb", "cpu_ms"):
            fig, got = want[field], r["figures"][field]
            assert got["median"] == fmt(fig["median"]), (r["cls"], r["variant"], field)
            # The quartiles where more than one profile stands behind the figure.
            assert got["spread"] == ([f"{fmt(fig['p25'])}\N{EN DASH}{fmt(fig['p75'])}"]
                                     if fig["n"] > 1 else [])
            # The count, where fewer profiles than the variant's carry the figure.
            assert got["n"] == (None if fig["n"] == want["devices"] else f"n {fig['n']}")
        assert r["sources"] == [f"{s} {n}" for s, n in want["energy_sources"].items()]
    # Spelled out: pi4's small, three profiles (one without memory), two sources.
    small = next(r for r in rows if (r["cls"], r["variant"]) == ("pi4-aarch64", "small"))
    assert small["profiled"] == "3"
    assert small["figures"]["latency_ms_p95"]["median"] == "2.02"
    assert small["figures"]["latency_ms_p95"]["spread"] == ["1.95\N{EN DASH}2.16"]
    assert small["figures"]["memory_mb"]["n"] == "n 2"
    assert small["sources"] == ["cpu_time_estimate 1", "hwmon 2"]
    cand = next(r for r in rows if r["variant"] == "cand")
    assert cand["profiled"] == "1" and cand["figures"]["latency_ms_p95"]["spread"] == []
    assert browser.run("return document.getElementById('class-info').textContent") == \
        "3 classes, 6 devices, 10 profiles"

    # Compact at this width: the table fits its box, the box fits the page.
    fits = browser.run("""
        const box = document.querySelector('#classes').parentElement;
        const t = document.getElementById('classes').getBoundingClientRect();
        return {table: t.right, box: box.getBoundingClientRect().right,
                page: document.documentElement.clientWidth,
                scroll: document.documentElement.scrollWidth};""")
    assert fits["table"] <= fits["box"] + 1 and fits["box"] <= fits["page"], fits
    assert fits["scroll"] <= fits["page"], fits
    browser.run("document.getElementById('classes-section').scrollIntoView()")
    browser.screenshot(SHOTS / "fleet-device-classes.png")

    # The filter: a class name keeps its class whole, a variant name its rows only.
    browser.type("#class-search", "x86")
    browser.wait("return document.getElementById('class-info').textContent"
                 ".startsWith('1 of 3 classes')", what="the x86 class only")
    assert [(r["cls"], r["variant"]) for r in browser.run(READ_CLASSES)] == [
        ("x86-avx2", "small"), ("x86-avx2", "big")]
    browser.type("#class-search", "cand")
    browser.wait("return document.getElementById('class-info').textContent"
                 ".startsWith('1 of 3 classes')"
                 " && document.querySelectorAll('#classes tbody tr').length === 1",
                 what="the candidate's row only")
    assert [(r["cls"], r["variant"]) for r in browser.run(READ_CLASSES)] == [
        ("pi4-aarch64", "cand")]
    browser.type("#class-search", "nothing-like-this")
    browser.wait("return document.querySelector('#classes tbody').textContent"
                 " === 'no class or variant matches'", what="no match")
    assert browser.console_errors() == []


def test_class_table_stays_on_screen_at_many_classes(fleet, browser):
    """Forty more classes with long names: the table scrolls inside its box, shorter
    than the window, and the page does not grow sideways."""
    store = fleet.svc.store
    specs = {n: VariantSpec.model_validate(store.variant(n).spec) for n in ("small", "big")}
    classes = {c: DeviceFacts(arch="aarch64", cores=4,
                              device_class=f"board-{c:02d}-with-a-rather-long-class-name")
               for c in range(40)}
    for c, facts in classes.items():
        r = ReportedState(
            device_id=f"many-{c:02d}", online=True, facts=facts,
            installed=[InstalledVariant(name=n, sha256=s.sha256, size=s.size)
                       for n, s in specs.items()],
            profiles={n: VariantProfile(sha256=s.sha256, latency_ms_p50=1.5 + c,
                                        latency_ms_p95=2.5 + c, cpu_ms=1.7, energy_mj=0.7,
                                        energy_source="rapl", runs=50, threads=1)
                      for n, s in specs.items()})
        store.set_reported(r)
        store.set_measurements(r)
    try:
        open_page(browser, fleet, "range=1h", "fleet")
        n = browser.run("return document.querySelectorAll('#classes tbody tr').length")
        assert n == 5 + 1 + 2 * 40
        box = browser.run("""
            const box = document.querySelector('#classes').parentElement;
            const r = box.getBoundingClientRect();
            return {h: r.height, scrollH: box.scrollHeight, right: r.right,
                    page: document.documentElement.clientWidth,
                    scroll: document.documentElement.scrollWidth,
                    vh: window.innerHeight};""")
        assert box["h"] < box["vh"] and box["scrollH"] > box["h"], box  # scrolls inside
        assert box["scroll"] <= box["page"] and box["right"] <= box["page"], box
        browser.run("document.getElementById('classes-section').scrollIntoView()")
        browser.screenshot(SHOTS / "fleet-device-classes-many.png")
        # In a narrow window the table scrolls sideways inside its box, which stays on
        # the page.
        set_window(browser, 820, 900)
        narrow = browser.wait("""
            const box = document.querySelector('#classes').parentElement;
            const r = box.getBoundingClientRect();
            return window.innerWidth === 820 && {right: r.right, wide: box.scrollWidth,
                inner: box.clientWidth, page: document.documentElement.clientWidth};""",
                              what="the narrow window")
        assert narrow["right"] <= narrow["page"] and narrow["wide"] > narrow["inner"], narrow
        browser.run("document.getElementById('classes-section').scrollIntoView()")
        browser.screenshot(SHOTS / "fleet-device-classes-narrow.png")
        assert browser.console_errors() == []
    finally:
        set_window(browser, 1440, 1000)
        for c in classes:
            store.delete_device(f"many-{c:02d}")


READ_DEVICE = """
return {
  facts: Object.fromEntries([...document.querySelectorAll('#device-hardware dd')]
    .map((d) => [d.dataset.fact, d.textContent])),
  rows: [...document.querySelectorAll('#device-profiles tbody tr')].map((tr) => ({
    variant: tr.dataset.variant || null, role: tr.dataset.role || null,
    cells: [...tr.cells].map((td) => td.textContent)})),
};
"""


def test_device_page_shows_its_facts_and_profiles_as_the_api_says(fleet, browser):
    api = fleet.api.device_profile("pi-0")
    assert api["profile_only"] == ["cand"] and api["active_variant"] == "small"
    classes = fleet.api.classes()["classes"]
    open_page(browser, fleet, "device=pi-0&range=1h", "device:pi-0")
    seen = browser.run(READ_DEVICE)
    f = api["facts"]
    assert seen["facts"] == {
        "class": "pi4-aarch64", "arch": "aarch64", "CPU": "Cortex-A72", "ISA": "neon",
        "cores": "4", "memory": "3,792 MB", "onnxruntime": "1.20.1",
        "providers": "CPUExecutionProvider", "active power": "0.9 W/core"}
    assert f["device_class"] == "pi4-aarch64" and f["cores"] == 4
    # Active first, then what it may serve, then the profile-only candidate.
    assert [(r["variant"], r["role"], r["cells"][1]) for r in seen["rows"]] == [
        ("small", "active", "active"), ("big", "installed", "installed"),
        ("cand", "profile-only", "profile-only candidate")]
    for r in seen["rows"]:
        p = api["profiles"][r["variant"]]
        cmed = classes["pi4-aarch64"]["variants"][r["variant"]]["latency_ms_p95"]
        measured = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p["ts"]))
        assert r["cells"] == [
            r["variant"], r["cells"][1], fmt(p["latency_ms_p50"]), fmt(p["latency_ms_p95"]),
            f"{fmt(cmed['median'])} (n {cmed['n']})", fmt(p["cpu_ms"]), fmt(p["memory_mb"]),
            fmt(p["energy_mj"]), p["energy_source"], str(p["runs"]), str(p["threads"]),
            measured], r["variant"]
    assert seen["rows"][0]["cells"][2:5] == ["1.11", "2.02", "2.02 (n 3)"]
    assert browser.console_errors() == []
    browser.screenshot(SHOTS / "device-pi-0-profiles.png", full_page=True)

    # pi-1 reported no memory for one variant.
    open_page(browser, fleet, "device=pi-1&range=1h", "device:pi-1")
    seen = browser.run(READ_DEVICE)
    small = next(r for r in seen["rows"] if r["variant"] == "small")
    assert small["role"] == "installed" and small["cells"][6] == "\N{EN DASH}"
    assert [r["variant"] for r in seen["rows"]] == ["big", "small"]
    open_page(browser, fleet, "device=lone-0&range=1h", "device:lone-0")
    seen = browser.run(READ_DEVICE)
    # A device-provided string is text, never markup.
    assert seen["facts"]["class"] == "armv7-lone" and seen["facts"]["CPU"] == EVIL
    assert seen["facts"]["ISA"] == "\N{EN DASH}"
    assert [r["cells"] for r in seen["rows"]] == [
        ["no profiles yet (the agent profiles each variant after installing it)"]]
    assert browser.run("return document.querySelectorAll('#device-hardware img').length"
                       " + (document.title === 'pwned' ? 1 : 0)") == 0
    assert browser.console_errors() == []


def test_device_without_facts_and_a_fleet_without_profiles_say_so(tmp_path, mosquitto,
                                                                  browser):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    try:
        open_page(browser, f, "range=1h", "fleet")
        text = browser.run("return document.querySelector('#classes tbody').textContent")
        assert text == ("no device has reported its facts and profiles yet (an agent "
                        "profiles each variant after installing it)")
        assert browser.run("return document.getElementById('class-info').textContent") == ""
        browser.run("document.getElementById('classes-section').scrollIntoView()")
        browser.screenshot(SHOTS / "fleet-device-classes-empty.png")
        f.svc.store.set_reported(ReportedState(device_id="old-agent", online=True))
        open_page(browser, f, "device=old-agent&range=1h", "device:old-agent")
        seen = browser.run(READ_DEVICE)
        assert seen["facts"] == {"class": "not reported yet"}
        assert seen["rows"] == [{"variant": None, "role": None, "cells": [
            "no profiles yet (the agent profiles each variant after installing it)"]}]
        # A variant installed and not yet profiled has its row, saying so.
        f.svc.store.set_reported(ReportedState(
            device_id="old-agent", online=True, active_variant="small",
            installed=[InstalledVariant(name="small", sha256="a" * 64, size=1)]))
        open_page(browser, f, "device=old-agent&range=1h", "device:old-agent")
        assert browser.run(READ_DEVICE)["rows"] == [{"variant": "small", "role": "active",
                                                     "cells": ["small", "active",
                                                               "not measured yet"]}]
        assert browser.console_errors() == []
    finally:
        f.close()


def test_profile_api_names_the_active_variant_and_the_candidates(fleet):
    for device, (_facts, profiles) in SEED.items():
        p = fleet.api.device_profile(device)
        assert set(p["profiles"]) == set(profiles)
        assert p["active_variant"] == ACTIVE.get(device)
        assert p["profile_only"] == (["cand"] if device in PROFILE_ONLY else [])
    assert fleet.api.device_profile("bare-0")["profile_only"] == []

