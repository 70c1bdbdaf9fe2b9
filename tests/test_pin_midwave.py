"""Pinning a device while its rollout wave is being judged keeps the wave's shadow
evaluation going: the re-signed desired state (pin, unpin, the periodic refresh) carries the
same shadow section, so the device goes on gathering the evidence its wave is judged on."""

from __future__ import annotations

import pytest
from fleet_helpers import wait_for
from onnx_models import make_mlp, scaled_copy
from rollout_helpers import Fleet

from prunefleet.shared.messages import Manifest, ShadowSpec, SignedManifest, decode

DEVICES = ["dev-0", "dev-1"]
# Nothing sends requests, so the wave waits for evidence for the whole test.
GATE = {"min_agreement": 0.97, "max_error_rate": 0.01, "max_p95_ratio": None,
        "min_requests": 1000, "observe_s": 900, "sample_share": 0.5}


@pytest.fixture
def fleet(tmp_path, mosquitto):
    f = Fleet(tmp_path, mosquitto.url)
    f.start_server()
    for d in DEVICES:
        f.start_agent(d)
    f.wait_known(DEVICES)
    yield f
    f.close()


def _desired(fleet: Fleet, device_id: str) -> Manifest:
    """The newest desired state the server signed for the device."""
    store = fleet.svc.store
    row = store.latest_manifest(device_id)
    assert row is not None
    return decode(Manifest, decode(SignedManifest, row.signed).payload)


def _evaluating(fleet: Fleet, device_id: str, version: int) -> ShadowSpec | None:
    """Once the agent follows ``version`` and evaluates its shadow section: that section."""
    agent = fleet.agent(device_id)
    m = agent.follower.manifest
    if m is None or m.version != version or not agent.shadow.active:
        return None
    return m.shadow


@pytest.mark.timeout(180)
def test_pin_and_unpin_mid_wave_keep_the_shadow_section(fleet, tmp_path):
    api = fleet.api
    base = make_mlp(tmp_path / "base.onnx", 32, seed=0)
    api.register_variant(base, name="base", macs=64 * 32 + 320, chunk_bytes=4096)
    good = scaled_copy(base, tmp_path / "good.onnx")
    api.register_variant(good, name="good", macs=64 * 32 + 319, chunk_bytes=4096)
    r0 = api.create_rollout({"target": {"kind": "fleet"}, "variants": ["base"]})
    fleet.wait_rollout(r0["id"], "completed", timeout_s=60)

    r1 = api.create_rollout({"target": {"kind": "fleet"}, "variants": ["good"],
                             "config": {"waves": [50, 100], "gate": GATE}})

    def wave1() -> list[str]:
        return [d["device_id"] for d in api.rollout(r1["id"])["devices"]
                if d["stage"] == "wave1"]

    (dev,) = wait_for(wave1, 30, what="wave 1 offered")
    offered = _desired(fleet, dev)
    assert offered.shadow is not None and offered.shadow.variants == ["good"]
    wait_for(lambda: _evaluating(fleet, dev, offered.version), 30,
             what=f"{dev} evaluating the wave's shadow section")

    pinned = api.pin(dev, "good")
    (done,) = pinned["devices"]
    m = _desired(fleet, dev)
    assert (m.version, m.pinned_variant) == (done["manifest_version"], "good")
    assert m.shadow == offered.shadow  # same rollout, variants, share and window end
    assert wait_for(lambda: _evaluating(fleet, dev, m.version), 30,
                    what=f"{dev} following the pinned state") == offered.shadow

    api.pin(dev, None)  # unpin
    m = _desired(fleet, dev)
    assert m.pinned_variant is None and m.shadow == offered.shadow
    wait_for(lambda: _evaluating(fleet, dev, m.version), 30,
             what=f"{dev} following the unpinned state")

    # The periodic re-signing (key change, manifests past half their lifetime) too.
    assert fleet.svc.controller.refresh_desired() >= 1
    m = _desired(fleet, dev)
    assert m.shadow == offered.shadow
    wait_for(lambda: _evaluating(fleet, dev, m.version), 30,
             what=f"{dev} following the re-signed state")
    # The periodic pass re-signs only states older than asked (half their lifetime).
    assert fleet.svc.controller.refresh_desired(older_than_s=3600) == 0
    assert _desired(fleet, dev).version == m.version
    assert fleet.svc.controller.refresh_desired(older_than_s=0) >= 1
    m = _desired(fleet, dev)
    assert m.shadow == offered.shadow
    wait_for(lambda: _evaluating(fleet, dev, m.version), 30,
             what=f"{dev} following the state re-signed for its age")

    # The wave still counts the device, and is still waiting for its evidence.
    r = api.rollout(r1["id"])
    assert r["status"] == "active" and wave1() == [dev]
