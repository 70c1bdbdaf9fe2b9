"""rollout_report: the phase of a rollout on a device, a pure function of what it knows."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from prunefleet.agent.phase import rollout_report
from prunefleet.shared import chunks
from prunefleet.shared.messages import Manifest, RolloutPhase, RolloutReport, VariantSpec


def _spec(name: str, size: int) -> VariantSpec:
    p = chunks.plan(name.encode() * (size // len(name)), 1024)
    return VariantSpec(name=name, sha256=p.sha256, size=p.size, chunk_bytes=1024,
                       chunk_sha256=list(p.chunk_sha256), input_shape=[1, 1, 8, 8],
                       num_classes=10, params=1, macs=1)


SMALL = _spec("s", 1000)  # a quarter of the bytes
LARGE = _spec("l", 3000)
MANIFEST = Manifest(target="dev-1", version=4, issued_at=1.0, expires_at=2.0,
                    variants=[SMALL, LARGE])


def report(*, failed: Collection[str] = (), serving: Collection[str] = (),
           verifying: bool = False, downloading: bool = False,
           progress: dict[str, float] | None = None, active: str | None = None,
           last_error: str | None = None) -> RolloutReport | None:
    by_name = {"s": SMALL, "l": LARGE}
    return rollout_report(MANIFEST, failed={by_name[n].sha256 for n in failed},
                          serving=lambda v: v.name in serving, verifying=verifying,
                          downloading=downloading, progress=progress or {}, active=active,
                          last_error=last_error)


def test_no_manifest_no_report() -> None:
    assert rollout_report(None, failed=(), serving=lambda v: True, verifying=False,
                          downloading=False, progress={}, active="s") is None


@pytest.mark.parametrize(
    ("case", "kw", "phase", "progress"),
    [
        ("offered", {}, RolloutPhase.OFFERED, 0.0),
        ("offered, one already serving", {"serving": {"s"}}, RolloutPhase.OFFERED, 0.25),
        ("downloading", {"downloading": True, "progress": {"s": 0.5, "l": 0.5}},
         RolloutPhase.DOWNLOADING, 0.5),
        ("downloading the rest", {"downloading": True, "serving": {"s"},
                                  "progress": {"l": 1 / 3}},
         RolloutPhase.DOWNLOADING, 0.5),
        ("verifying", {"verifying": True, "serving": {"s"}, "progress": {"l": 1.0}},
         RolloutPhase.VERIFYING, 1.0),
        ("verifying wins over all installed", {"verifying": True, "serving": {"s", "l"}},
         RolloutPhase.VERIFYING, 1.0),
        ("installed", {"serving": {"s", "l"}}, RolloutPhase.INSTALLED, 1.0),
        ("installed, serving one of the old", {"serving": {"s", "l"}, "active": "old"},
         RolloutPhase.INSTALLED, 1.0),
        ("active", {"serving": {"s", "l"}, "active": "l"}, RolloutPhase.ACTIVE, 1.0),
        ("active only once all serve", {"serving": {"s"}, "active": "s",
                                        "downloading": True},
         RolloutPhase.DOWNLOADING, 0.25),
    ],
)
def test_phase(case: str, kw: dict, phase: RolloutPhase, progress: float) -> None:
    assert report(**kw) == RolloutReport(manifest_version=4, phase=phase, progress=progress)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"downloading": True, "progress": {"l": 0.9}},
        {"verifying": True},
        {"serving": {"s"}, "active": "s"},
    ],
)
def test_a_failed_variant_wins_with_its_reason(kw: dict) -> None:
    r = report(failed={"l"}, last_error="l: smoke test output differs", **kw)
    assert r == RolloutReport(manifest_version=4, phase=RolloutPhase.FAILED,
                              reason="l: smoke test output differs")


def test_a_failure_without_a_recorded_error_still_says_why_in_bounds() -> None:
    r = report(failed={"s"})
    assert r is not None and r.reason == "install failed"
    r = report(failed={"s"}, last_error="x" * 5000)
    assert r is not None and r.reason == "x" * 1024
