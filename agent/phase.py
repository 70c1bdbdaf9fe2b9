"""The phase of a rollout on this device, as the server's rollout controller tracks it.

A pure function of what the device knows: the manifest it follows, which of its
variants failed, serve, are being verified or downloaded, and the active variant.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from prunefleet.shared.messages import (
    MAX_VERSION,
    Manifest,
    RolloutPhase,
    RolloutReport,
    VariantSpec,
)

__all__ = ["rollout_report"]


def rollout_report(
    manifest: Manifest | None,
    *,
    failed: Collection[str],
    serving: Callable[[VariantSpec], bool],
    verifying: bool,
    downloading: bool,
    progress: Mapping[str, float],
    active: str | None,
    last_error: str | None = None,
    rejected: tuple[int, str] | None = None,
) -> RolloutReport | None:
    """``failed`` holds digests; ``progress`` maps a variant name to the share of its
    chunks already stored. Failed wins over every other phase; then verifying; then
    installed (all variants serve) or active (one of them is the served variant).
    ``rejected``: (version, why) of a desired state refused; another version than the one
    followed, it is reported as that version's failure."""
    m = manifest
    if rejected is not None and (m is None or rejected[0] != m.version) \
            and rejected[0] <= MAX_VERSION:
        return RolloutReport(manifest_version=rejected[0], phase=RolloutPhase.FAILED,
                             reason=rejected[1][:1024])
    if m is None:
        return None
    if any(v.sha256 in failed for v in m.variants):
        return RolloutReport(manifest_version=m.version, phase=RolloutPhase.FAILED,
                             reason=(last_error or "install failed")[:1024])
    ready = [v for v in m.variants if serving(v)]
    if verifying:
        phase = RolloutPhase.VERIFYING
    elif len(ready) == len(m.variants):
        is_active = active is not None and any(v.name == active for v in ready)
        phase = RolloutPhase.ACTIVE if is_active else RolloutPhase.INSTALLED
    elif downloading:
        phase = RolloutPhase.DOWNLOADING
    else:
        phase = RolloutPhase.OFFERED
    total = sum(v.size for v in m.variants)
    done = sum(v.size * (1.0 if v in ready else progress.get(v.name, 0.0)) for v in m.variants)
    return RolloutReport(manifest_version=m.version, phase=phase,
                         progress=round(min(1.0, done / total), 3))
