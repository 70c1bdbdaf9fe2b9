"""The variant store: installed ONNX files in the agent's state directory.

Layout::

    <state>/variants/<sha256>.onnx     content-addressed, immutable once installed
    <state>/variants/.<sha256>.part    a download in progress (same dir: os.replace is atomic)
    <state>/variants/.<sha256>.done    indexes of chunks already written and synced
    <state>/installed.json             name → spec of every installed variant
    <state>/trust.json                 highest manifest version accepted
    <state>/revoked-keys.json          signing key ids a verified manifest revoked
    <state>/reprofile.json             the highest re-profile request acted on

Every write of a small file goes through :func:`prunefleet.shared.fsutil.atomic_write`:
temp file in the same directory, fsync, ``os.replace``, fsync of the directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prunefleet.shared.fsutil import atomic_write
from prunefleet.shared.messages import VariantSpec

log = logging.getLogger(__name__)


class VariantStore:
    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "variants"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index_path = self.state_dir / "installed.json"
        self._trust_path = self.state_dir / "trust.json"
        self._installed: dict[str, VariantSpec] = self._load_index()

    def _load_index(self) -> dict[str, VariantSpec]:
        if not self._index_path.exists():
            return {}
        try:
            raw = json.loads(self._index_path.read_text())
            out = {name: VariantSpec.model_validate(spec) for name, spec in raw.items()}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError) as e:
            # A corrupt index must not stop the agent: it re-fetches what it needs.
            log.error("installed.json unreadable (%s); starting with no variants", e)
            return {}
        return {n: s for n, s in out.items() if self.path_of(s.sha256).exists()}

    def _save_index(self) -> None:
        data = {n: s.model_dump(mode="json") for n, s in self._installed.items()}
        atomic_write(self._index_path, json.dumps(data, indent=1).encode())

    # -- queries ------------------------------------------------------------------------
    def path_of(self, sha256: str) -> Path:
        return self.dir / f"{sha256}.onnx"

    def part_path(self, sha256: str) -> Path:
        return self.dir / f".{sha256}.part"

    def done_path(self, sha256: str) -> Path:
        return self.dir / f".{sha256}.done"

    def installed(self) -> dict[str, VariantSpec]:
        return dict(self._installed)

    def has(self, spec: VariantSpec) -> bool:
        cur = self._installed.get(spec.name)
        return cur is not None and cur.sha256 == spec.sha256

    def have_blob(self, sha256: str) -> bool:
        return self.path_of(sha256).exists()

    # -- changes ------------------------------------------------------------------------
    def record(self, spec: VariantSpec) -> None:
        """Mark a verified blob as installed under ``spec.name``."""
        self._installed[spec.name] = spec
        self._save_index()

    def forget(self, name: str) -> None:
        spec = self._installed.pop(name, None)
        if spec is None:
            return
        self._save_index()
        if all(s.sha256 != spec.sha256 for s in self._installed.values()):
            self.path_of(spec.sha256).unlink(missing_ok=True)

    def _trust(self) -> dict[str, int]:
        try:
            raw = json.loads(self._trust_path.read_text())
            return {str(k): int(v) for k, v in raw.items() if k in ("device", "group")}
        except (OSError, ValueError, TypeError, AttributeError, RecursionError):
            return {}  # unreadable: the floors start again from the next manifest

    def accepted_version(self, source: str | None = None) -> int:
        """Highest manifest version accepted from ``source`` ("device" or "group"), or from
        either when ``source`` is None. Rollback protection is per source: a group's
        desired state has its own history beside the device's."""
        trust = self._trust()
        if source is None:
            return max(trust.values(), default=0)
        return trust.get(source, 0)

    def set_accepted_version(self, version: int, source: str = "device") -> None:
        trust = self._trust()
        trust[source] = max(version, trust.get(source, 0))
        atomic_write(self._trust_path, json.dumps(trust).encode())

    def revoked_keyids(self) -> frozenset[str]:
        """Key ids never to trust again. An unreadable file cannot un-revoke anything:
        a key it held is trusted again only until the next manifest names it."""
        try:
            raw = json.loads((self.state_dir / "revoked-keys.json").read_text())
            return frozenset(k for k in raw if isinstance(k, str) and len(k) == 64)
        except FileNotFoundError:
            return frozenset()
        except (OSError, ValueError, TypeError, RecursionError) as e:
            log.error("revoked-keys.json unreadable (%s)", e)
            return frozenset()

    def add_revoked(self, keyids: frozenset[str] | set[str]) -> None:
        data = sorted(self.revoked_keyids() | set(keyids))
        atomic_write(self.state_dir / "revoked-keys.json", json.dumps(data).encode())

    def reprofile_epoch(self) -> int:
        """The highest re-profile request (``Manifest.reprofile``) acted on; 0 when none or
        unreadable (a request is then acted on once more, which costs a profile only)."""
        try:
            return int(json.loads((self.state_dir / "reprofile.json").read_text())["epoch"])
        except FileNotFoundError:
            return 0
        except (OSError, ValueError, TypeError, KeyError, RecursionError) as e:
            log.error("reprofile.json unreadable (%s)", e)
            return 0

    def set_reprofile_epoch(self, epoch: int) -> None:
        atomic_write(self.state_dir / "reprofile.json", json.dumps({"epoch": epoch}).encode())

    def save_manifest(self, signed: bytes) -> None:
        """The signed manifest the agent follows, kept across restarts."""
        atomic_write(self.state_dir / "manifest.json", signed)

    def load_manifest(self) -> bytes | None:
        try:
            return (self.state_dir / "manifest.json").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("manifest.json unreadable (%s); waiting for the retained one", e)
            return None
