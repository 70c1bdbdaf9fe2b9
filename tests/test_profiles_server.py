"""The server keeps what devices measured: facts and on-device profiles per device,
aggregated per device class, through the API and the admin CLI.

End to end on real mosquitto: real agents (ONNX Runtime) install variants through a
rollout, profile them on this machine, and report; the store is also driven directly for
what a hostile device might send.
"""

from __future__ import annotations

import json

import pytest
from fleet_helpers import wait_for
from rollout_helpers import Fleet

from prunefleet.server import cli
from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared.messages import (
    DeviceFacts,
    InstalledVariant,
    ReportedState,
    VariantProfile,
)


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    yield f
    f.close()


@pytest.mark.timeout(120)
def test_devices_profile_their_variants_and_the_server_aggregates_them_per_class(
        fleet, capsys, monkeypatch):
    devices = ["prof-0", "prof-1"]
    for d in devices:
        fleet.start_agent(d)
    fleet.wait_known(devices)
    fleet.register_mlp("small", hidden=8)
    fleet.register_mlp("big", hidden=64, seed=1)
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": devices},
                                  "variants": ["small", "big"]})
    fleet.wait_rollout(r["id"], "completed")

    def profiled(d: str) -> dict | None:
        p = fleet.api.device_profile(d)
        return p if set(p["profiles"]) == {"small", "big"} else None

    got = {d: wait_for(lambda d=d: profiled(d), 60, what=f"{d}'s profiles") for d in devices}
    p = got["prof-0"]
    assert p["facts"]["cores"] >= 1 and p["facts"]["ort_version"]
    cls = p["device_class"]
    assert cls == fleet.agent("prof-0").facts.device_class
    for name in ("small", "big"):
        prof = p["profiles"][name]
        assert prof["runs"] >= 5 and 0 < prof["latency_ms_p50"] <= prof["latency_ms_p95"]
        assert prof["energy_source"] == "cpu_time_estimate"  # no meter on a simulated device
    # Both devices are this machine: one class, two devices behind each figure.
    classes = fleet.api.classes()["classes"]
    assert classes[cls]["devices"] == 2
    big = classes[cls]["variants"]["big"]
    assert big["devices"] == 2 and big["latency_ms_p50"]["n"] == 2
    lat = sorted(g["profiles"]["big"]["latency_ms_p50"] for g in got.values())
    assert big["latency_ms_p50"]["min"] == pytest.approx(lat[0])
    assert big["energy_sources"] == {"cpu_time_estimate": 2}

    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    assert cli.main(["devices", "profile", "prof-0"]) == 0
    out = capsys.readouterr().out
    assert f"class {cls}" in out and "big" in out and "cpu_time_estimate" in out
    # Each variant's role: both were offered for serving, neither is a profile-only candidate.
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["big"], ["small"])]
    assert len(rows) == 2 and {r[1] for r in rows} <= {"active", "installed"}, out
    assert cli.main(["classes"]) == 0
    out = capsys.readouterr().out
    assert cls in out and "small" in out
    assert cli.main(["classes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"][cls]["devices"] == 2
    assert cli.main(["devices", "profile", "nobody"]) == 1
    assert "no device 'nobody' (HTTP 404)" in capsys.readouterr().err


def _profile(sha: str, ms: float) -> VariantProfile:
    return VariantProfile(sha256=sha, latency_ms_p50=ms, latency_ms_p95=ms, cpu_ms=ms,
                          energy_mj=ms, energy_source="rapl", runs=50, threads=1)


def test_only_profiles_of_registered_variants_a_device_has_installed_count(tmp_path):
    store = Store(sqlite_url(tmp_path / "s.db"))
    known, unknown, other = "a" * 64, "b" * 64, "c" * 64
    store.add_variant("v", known, "v.onnx", {}, {})
    facts = DeviceFacts(arch="aarch64", cores=4, device_class="pi4")
    for i, ms in enumerate((1.0, 2.0, 9.0)):
        store.set_measurements(ReportedState(
            device_id=f"d{i}", online=True, facts=facts,
            installed=[InstalledVariant(name="v", sha256=known, size=1),
                       InstalledVariant(name="x", sha256=unknown, size=1)],
            profiles={"v": _profile(known, ms),
                      "x": _profile(unknown, 0.1),  # never registered here
                      "y": _profile(other, 0.1)}))  # not even installed
    figures = store.class_measurements()["pi4"]
    assert figures["devices"] == 3 and list(figures["variants"]) == ["v"]
    lat = figures["variants"]["v"]["latency_ms_p50"]
    assert (lat["n"], lat["median"], lat["p25"], lat["p75"]) == (3, 2.0, 1.5, 5.5)
    # A later report without facts keeps them; one without the variant drops its profile.
    store.set_measurements(ReportedState(device_id="d2", online=True))
    assert store.device_measurements("d2") == (facts.model_dump(mode="json"), {})
    assert store.class_measurements()["pi4"]["variants"]["v"]["devices"] == 2
    # A Last Will says nothing about measurements.
    store.set_measurements(ReportedState(device_id="d0", online=False))
    assert set(store.device_measurements("d0")[1]) == {"v"}


@pytest.mark.timeout(240)
def test_prepare_for_a_class_fits_the_profiles_real_agents_reported(
        fleet, capsys, monkeypatch, tmp_path):
    """``prepare --for-class`` against a running server: the class's latency line comes
    from what this fleet's agents measured, joined to the registered variants' MACs."""
    from test_prepare_target import RECIPE, _with_target

    devices = ["cls-0", "cls-1"]
    for d in devices:
        fleet.start_agent(d)
    fleet.wait_known(devices)
    for name, hidden, seed in (("h8", 8, 0), ("h64", 64, 1), ("h256", 256, 2)):
        fleet.register_mlp(name, hidden=hidden, seed=seed)
    names = {"h8", "h64", "h256"}
    r = fleet.api.create_rollout({"target": {"kind": "devices", "devices": devices},
                                  "variants": sorted(names)})
    fleet.wait_rollout(r["id"], "completed")
    cls = fleet.agent(devices[0]).facts.device_class
    wait_for(lambda: all(names <= set(fleet.api.device_profile(d)["profiles"])
                         for d in devices), 90, what="every variant profiled on both devices")
    classes = fleet.api.classes()["classes"][cls]["variants"]

    monkeypatch.setenv("PRUNEFLEET_SERVER", fleet.svc.url)
    monkeypatch.setenv("PRUNEFLEET_TOKEN", fleet.svc.token)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(_with_target(RECIPE, "latency_budget_ms = 50"))
    out = tmp_path / "out"
    rc = cli.main(["prepare", str(recipe), "--out", str(out), "--for-class", cls])
    err = capsys.readouterr().err
    assert rc == 0, err
    t = json.loads((out / "report.json").read_text())["target"]
    assert t["device_class"] == cls and t["latency_source"] == f"fleet profiles of class {cls}"
    fit = t["latency_model"]["fits"]["fp32"]
    # The fit's points are the server's medians of what the agents measured, per variant.
    points = {name: (macs, ms) for name, macs, ms in fit["points"]}
    assert set(points) == names
    registered = {v["name"]: v for v in fleet.api.variants()}
    for name, (macs, ms) in points.items():
        assert macs == registered[name]["macs"]
        assert ms == pytest.approx(classes[name]["latency_ms_p95"]["median"])
    assert fit["loo_mae_ms"] is not None  # three points: a leave-one-out error
