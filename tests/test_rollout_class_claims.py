"""A device's class is its own word (docs/security.md): a device that reports one class,
is taken into that class's rollout, then reports another, must not hold or supersede the
rollout of the class it left, nor sit in two rollouts at once. The controller on a real
store (SQLite), with a fleet that signs and stores desired states without a broker."""

from __future__ import annotations

import time

import pytest

from prunefleet.server.controller import RolloutController, RolloutRequest
from prunefleet.server.errors import RolloutError
from prunefleet.server.store import Store, sqlite_url
from prunefleet.shared import chunks
from prunefleet.shared.messages import DeviceFacts, Manifest, ReportedState, VariantSpec
from prunefleet.shared.signing import SigningKey

KEY = SigningKey.generate()


class SigningFleet:
    """What FleetServer.deploy does to the store (sign, save), without publishing."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def deploy(self, target, variants, *, group=False, pinned=None, policy=None,
               timeout_s=30.0, shadow=None, sent=None, reprofile=0) -> Manifest:
        v = self.store.next_manifest_version()
        now = time.time()
        m = Manifest(target=target, version=v, issued_at=now, expires_at=now + 3600,
                     variants=variants, pinned_variant=pinned, policy=policy,
                     shadow=shadow, reprofile=reprofile)
        self.store.save_manifest(v, target, KEY.sign(m).encode().decode())
        return m


def _report(store: Store, device_id: str, device_class: str) -> None:
    r = ReportedState(device_id=device_id, online=True,
                      facts=DeviceFacts(arch="x86_64", cores=4, device_class=device_class))
    store.set_reported(r)
    store.set_measurements(r)


@pytest.fixture
def store(tmp_path):
    s = Store(sqlite_url(tmp_path / "s.db"))
    p = chunks.plan(b"w" * 3000, 1024)
    spec = VariantSpec(name="v1", sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 8],
                       num_classes=10, params=1, macs=1)
    s.add_variant("v1", p.sha256, "v1.onnx", spec.model_dump(mode="json"), {})
    yield s
    s.close()


def _to(device_class: str, **extra: object) -> RolloutRequest:
    return RolloutRequest.model_validate(
        {"target": {"kind": "class", "device_class": device_class}, "variants": ["v1"],
         **extra})


def test_a_device_that_changes_its_class_holds_no_other_class_rollout(store):
    for d, c in (("x1", "cls-x"), ("x2", "cls-x"), ("hopper", "cls-x"),
                 ("y1", "cls-y"), ("y2", "cls-y")):
        _report(store, d, c)
    ctl = RolloutController(SigningFleet(store), store)
    rx = ctl.create(_to("cls-x"))
    _report(store, "hopper", "cls-y")  # it now says it is class Y
    ry = ctl.create(_to("cls-y"))  # was: 409, "held by unfinished rollout"
    assert store.rollout(rx).status != "superseded"
    assert {rd.device_id for rd in store.rollout_devices(ry)} == {"y1", "y2"}
    ctl.tick()  # class members are resolved again: still not in two rollouts at once
    assert {rd.device_id for rd in store.rollout_devices(ry)} == {"y1", "y2"}
    assert "hopper" in {rd.device_id for rd in store.rollout_devices(rx)}
    # A second rollout to the same class is still the operator's conflict.
    with pytest.raises(RolloutError, match="held by unfinished"):
        ctl.create(_to("cls-x"))
