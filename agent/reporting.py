"""The device's reported state: what it says, and when it is due.

The reported state is retained on the broker; the server reads rollout phases, counters
and versions from it. It is published when something a reader would notice changed
(:meth:`Reporter.mark`), and when the problem counters moved, at most every
``problems_interval_s`` (a flood of bad messages must not become a flood of reports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prunefleet.shared.messages import (
    DeviceFacts,
    InstalledVariant,
    ReportedState,
    RolloutReport,
    Signature,
    VariantProfile,
    VariantSpec,
)

__all__ = ["Counters", "Reporter"]


@dataclass
class Counters:
    """What the device refused or dropped, besides the transport and queue counters."""

    invalid_messages: int = 0
    rejected_manifests: int = 0
    installs: int = 0
    install_failures: int = 0


class Reporter:
    def __init__(self, device_id: str, group: str | None, agent_version: str,
                 problems_interval_s: float = 10.0) -> None:
        self.device_id = device_id
        self.group = group
        self.agent_version = agent_version
        self.problems_interval_s = problems_interval_s
        self.counters = Counters()
        self.last_error: str | None = None
        # Changes marked, and how many of them the last report sent covered. A count, not
        # a flag: a request thread may mark a change (a switch) while the loop thread
        # builds a report, and clearing a flag after publishing would lose it.
        self.marks = 1
        self._marks_sent = 0
        self._problems_sent = 0
        self._sent_at = -1e18

    def mark(self) -> None:
        """Something a reader of the reported state would notice changed (any thread)."""
        self.marks += 1

    @property
    def dirty(self) -> bool:
        return self.marks != self._marks_sent

    def due(self, problems: int, now: float) -> bool:
        if self.dirty:
            return True
        return problems != self._problems_sent and now - self._sent_at >= self.problems_interval_s

    def sent(self, problems: int, now: float, marks: int) -> None:
        """A report went out, built after ``marks`` (read before building it) and with
        ``problems``: a change marked since stays due."""
        self._marks_sent = marks
        self._problems_sent = problems
        self._sent_at = now

    def build(
        self,
        *,
        online: bool,
        ts: float,
        manifest_version: int | None,
        active: str | None,
        installed: Mapping[str, VariantSpec],
        downloading: dict[str, float],
        rollout: RolloutReport | None,
        extra_counters: Mapping[str, int],
        facts: DeviceFacts | None = None,
        profiles: Mapping[str, VariantProfile] | None = None,
        version_proof: Sequence[Signature] = (),
    ) -> ReportedState:
        """``facts`` go in the first report after each connection; ``profiles`` of the
        installed variants in every one."""
        c = self.counters
        return ReportedState(
            device_id=self.device_id,
            online=online,
            ts=ts,
            group=self.group,
            agent_version=self.agent_version,
            manifest_version=manifest_version,
            version_proof=list(version_proof),
            active_variant=active,
            installed=[InstalledVariant(name=n, sha256=s.sha256, size=s.size)
                       for n, s in sorted(installed.items())],
            downloading=downloading,
            last_error=self.last_error,
            rollout=rollout,
            counters={
                "invalid_messages": c.invalid_messages,
                "rejected_manifests": c.rejected_manifests,
                "install_failures": c.install_failures,
                **extra_counters,
            },
            facts=facts,
            profiles={n: p for n, p in sorted((profiles or {}).items())
                      if n in installed and installed[n].sha256 == p.sha256},
        )
