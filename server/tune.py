"""``prunefleet tune --class CLASS``: measure candidate variants on devices of one class,
through the fleet, and write the variant set to roll out to that class.

1. Pick ``--devices`` online devices that report the class and follow a desired state
   from this server (by device id).
2. Offer them a **profile-only** rollout (``RolloutConfig.profile_only``): each device's
   own desired state (its variants, pin and policy), signed anew, with the candidates it
   does not have beside it marked ``profile_only``. The agent installs, smoke-tests and
   profiles them, and never serves them (``ModelPool.servable``).
3. Wait for each device's profile of each candidate (``GET /v1/devices/{id}/profile``),
   until all are in, the devices that failed to install are counted out, or the deadline.
4. Roll the rollout back: each device gets its own desired state again, and retires the
   candidates.
5. Choose (:func:`choose`, pure) and write the chosen set with its figures.

The choice: a candidate's class latency is the median over the measured devices of its
on-device p95. Candidates not measured anywhere, or over ``--budget-ms``, are out; of the
rest, one that another beats (as fast or faster and at least as accurate, one of them
strictly) is out; the remaining are ranked by declared accuracy (unknown last), then by
p95, and the first ``--max-variants`` are the set. Ranked by accuracy on the Pareto front,
the set is the most accurate candidate that meets the budget, then the next cheaper ones
that still pay for themselves in accuracy: a spread the device's policy can move along.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adminclient import AdminClient, ApiError, UsageError, check_id

__all__ = ["Candidate", "Row", "TuneError", "TuneOptions", "choose", "run_tune"]

DEFAULT_DEVICES = 3
DEFAULT_MAX_VARIANTS = 3
DEFAULT_TIMEOUT_S = 600.0


class TuneError(Exception):
    """The tune cannot start or gave nothing to choose from (one line for the CLI)."""


@dataclass(frozen=True)
class Candidate:
    """A registered variant offered for measurement, and what the devices measured."""

    name: str
    sha256: str
    accuracy: float | None = None
    macs: int = 0
    # Per device that profiled it: its on-device latency p95 and p50 (ms).
    p95_ms: Mapping[str, float] = field(default_factory=dict)
    p50_ms: Mapping[str, float] = field(default_factory=dict)
    # Devices it was expected on (the picked ones it could be measured on).
    expected: int = 0


@dataclass(frozen=True)
class Row:
    """A candidate's figures and the verdict on it."""

    name: str
    sha256: str
    accuracy: float | None
    macs: int
    devices_measured: int
    devices_expected: int
    p95_ms: float | None  # median over the measured devices
    p50_ms: float | None
    p95_ms_by_device: dict[str, float]
    meets_budget: bool | None
    chosen: bool
    why: str


def _acc(c: Candidate) -> float:
    return -1.0 if c.accuracy is None else c.accuracy


def choose(candidates: Sequence[Candidate], budget_ms: float | None,
           max_variants: int = DEFAULT_MAX_VARIANTS) -> list[Row]:
    """The verdict on each candidate (chosen ones first, in rank order)."""
    if max_variants < 1:
        raise ValueError("max_variants must be at least 1")
    p95 = {c.sha256: statistics.median(c.p95_ms.values()) for c in candidates if c.p95_ms}
    why: dict[str, str] = {}
    for c in candidates:
        if c.sha256 not in p95:
            why[c.sha256] = "no evidence: no device profiled it"
        elif budget_ms is not None and p95[c.sha256] > budget_ms:
            why[c.sha256] = f"over budget: p95 {p95[c.sha256]:.3f} ms > {budget_ms:g} ms"
    fits = [c for c in candidates if c.sha256 not in why]
    for c in fits:
        for o in fits:
            if o is c:
                continue
            faster, better = p95[o.sha256] <= p95[c.sha256], _acc(o) >= _acc(c)
            strictly = p95[o.sha256] < p95[c.sha256] or _acc(o) > _acc(c)
            if faster and better and (strictly or o.sha256 < c.sha256):
                why[c.sha256] = (f"beaten by {o.name}: as fast or faster and at least as "
                                 "accurate")
                break
    front = sorted((c for c in fits if c.sha256 not in why),
                   key=lambda c: (-_acc(c), p95[c.sha256], c.name))
    for c in front[max_variants:]:
        why[c.sha256] = f"beyond --max-variants {max_variants}"
    chosen = front[:max_variants]
    for rank, c in enumerate(chosen, 1):
        why[c.sha256] = ("the most accurate within budget" if rank == 1 else
                         f"rank {rank}: cheaper than the ones above, less accurate")
    order = {c.sha256: i for i, c in enumerate(chosen)}
    rows = []
    for c in sorted(candidates, key=lambda c: (order.get(c.sha256, len(order)), c.name)):
        fig = p95.get(c.sha256)
        rows.append(Row(
            name=c.name, sha256=c.sha256, accuracy=c.accuracy, macs=c.macs,
            devices_measured=len(c.p95_ms), devices_expected=c.expected, p95_ms=fig,
            p50_ms=statistics.median(c.p50_ms.values()) if c.p50_ms else None,
            p95_ms_by_device=dict(sorted(c.p95_ms.items())),
            meets_budget=None if fig is None or budget_ms is None else fig <= budget_ms,
            chosen=c.sha256 in order, why=why[c.sha256]))
    return rows


# -- the loop through the fleet ---------------------------------------------------------------
@dataclass(frozen=True)
class TuneOptions:
    device_class: str
    candidates: tuple[str, ...]  # registered variants: sha256 or name
    devices: int = DEFAULT_DEVICES
    budget_ms: float | None = None
    max_variants: int = DEFAULT_MAX_VARIANTS
    timeout_s: float = DEFAULT_TIMEOUT_S
    poll_s: float = 1.0


def pick_devices(listing: Sequence[Mapping[str, Any]], n: int) -> list[str]:
    """The first ``n`` (by id) online, unrevoked devices that follow a desired state from
    this server (a profile-only offer keeps it, so there must be one)."""
    ok = sorted(d["device_id"] for d in listing
                if d.get("online") and not d.get("revoked") and d.get("manifest_version"))
    return ok[:n]


def run_tune(client: AdminClient, opts: TuneOptions, *,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep,
             wall: Callable[[], float] = time.time,
             say: Callable[[str], None] = lambda _: None) -> dict:
    """Measure, restore, choose: the document ``--out`` holds."""
    listing = client.class_devices(opts.device_class)["devices"]
    picked = pick_devices(listing, opts.devices)
    if not picked:
        raise TuneError(f"no online device of class {opts.device_class!r} follows a desired "
                        f"state from this server ({len(listing)} device(s) report the class)")
    started = wall()
    body = {"target": {"kind": "devices", "devices": picked},
            "variants": list(dict.fromkeys(opts.candidates)),
            "config": {"profile_only": True, "canary_percent": 100,
                       "failure_threshold": 0.99, "device_timeout_s": opts.timeout_s}}
    try:
        rollout = client.create_rollout(body)
    except ApiError as e:
        hint = ": register them first (prunefleet variants register REPORT)" \
            if e.status == 404 else ""
        raise TuneError(f"cannot offer the candidates: {e}{hint}") from e
    rid = rollout["id"]
    # The server resolved each candidate (a name: its newest registration).
    registered = {v["sha256"]: v for v in client.variants()}
    variants = [registered.get(v["sha256"], v) for v in rollout["variants"]]
    say(f"rollout #{rid}: {len(variants)} candidate(s) offered profile-only to "
        f"{', '.join(picked)}")
    p95: dict[str, dict[str, float]] = {v["sha256"]: {} for v in variants}
    p50: dict[str, dict[str, float]] = {v["sha256"]: {} for v in variants}
    failed: dict[str, str] = {}
    restored: dict[str, Any] = {}
    deadline = clock() + opts.timeout_s
    try:
        while True:
            for d in picked:
                for prof in client.device_profile(d)["profiles"].values():
                    if prof.get("sha256") in p95:
                        p95[prof["sha256"]][d] = float(prof["latency_ms_p95"])
                        p50[prof["sha256"]][d] = float(prof["latency_ms_p50"])
            for rd in client.rollout(rid).get("devices") or []:
                if rd["phase"] == "failed":
                    failed[rd["device_id"]] = rd.get("reason") or "install failed"
            pending = [(d, s) for s in p95 for d in picked if d not in p95[s] and d not in failed]
            if not pending or clock() >= deadline:
                break
            sleep(opts.poll_s)
    finally:
        try:
            restored = client.rollout_action(rid, "rollback").get("rollback", {})
        except ApiError as e:  # a newer rollout took the devices over: it restored them
            restored = {"error": str(e)}
            say(f"rollout #{rid}: not rolled back: {e}")
    missing = sorted(f"{d}:{v['name']}" for v in variants for d in picked
                     if d not in p95[v["sha256"]])
    candidates = [Candidate(name=v["name"], sha256=v["sha256"], accuracy=v.get("accuracy"),
                            macs=int(v.get("macs") or 0), p95_ms=p95[v["sha256"]],
                            p50_ms=p50[v["sha256"]],
                            expected=len([d for d in picked if d not in failed]))
                  for v in variants]
    rows = choose(candidates, opts.budget_ms, opts.max_variants)
    chosen = [r for r in rows if r.chosen]
    return {
        "class": opts.device_class,
        "variants": [r.sha256 for r in chosen],
        "tune": {
            "device_class": opts.device_class, "budget_ms": opts.budget_ms,
            "max_variants": opts.max_variants, "devices": picked, "rollout_id": rid,
            "evidence": "partial" if missing else "complete", "missing": missing,
            "failed_devices": failed, "started_at": started, "finished_at": wall(),
            "restored": restored.get("restored", []) if "error" not in restored else [],
            "rollback_error": restored.get("error"),
            "chosen": [r.name for r in chosen],
            "candidates": [asdict(r) for r in rows],
        },
    }


# -- command line -----------------------------------------------------------------------------
def candidates_from(path: Path) -> list[str]:
    """The sha256 of each variant of a ``prepare`` output directory or its report.json."""
    from prunefleet.shared.chunks import sha256_file

    report = path / "report.json" if path.is_dir() else path
    try:
        entries = json.loads(report.read_text())["variants"]
        if not isinstance(entries, list) or not entries:
            raise TypeError("'variants' is not a list of entries")
        return [v.get("sha256") or sha256_file(report.parent / v["file"]) for v in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--candidates {path}: not a prepare report or output directory: "
                         f"{e}") from e


def _cmd_tune(args: argparse.Namespace, client: AdminClient) -> int:
    from .history import parse_duration

    check_id(args.device_class, "device class")
    refs = [*(candidates_from(args.candidates) if args.candidates else []),
            *(args.variant or [])]
    if not refs:
        raise UsageError("name the candidates: --candidates DIR_OR_REPORT or --variant")
    for ref in args.variant or []:
        check_id(ref, "variant (name or sha256)")
    if args.devices < 1 or args.max_variants < 1:
        raise UsageError("--devices and --max-variants must be at least 1")
    if args.budget_ms is not None and not args.budget_ms > 0:
        raise UsageError("--budget-ms must be more than 0")
    try:
        timeout_s = parse_duration(args.timeout)
    except ValueError as e:
        raise UsageError(f"--timeout: {e}") from e
    out = args.out or Path(f"tuned-{args.device_class}.json")
    opts = TuneOptions(args.device_class, tuple(refs), args.devices, args.budget_ms,
                       args.max_variants, timeout_s, args.poll)
    try:
        doc = run_tune(client, opts, say=lambda s: print(s, file=sys.stderr))
    except TuneError as e:
        print(f"prunefleet: {e}", file=sys.stderr)
        return 1
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    t = doc["tune"]
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print_rows(t["candidates"])
        print(f"\nevidence {t['evidence']}" + (
            f": no profile of {', '.join(t['missing'][:6])}" if t["missing"] else "")
            + f"; devices {', '.join(t['devices'])} restored (rollout #{t['rollout_id']})")
        print(f"wrote {out}: {', '.join(t['chosen']) or 'no variant'}"
              + (f" for class {doc['class']} (prunefleet rollout create --file {out})"
                 if t["chosen"] else ""))
    if not doc["variants"]:
        print(f"prunefleet: no candidate measured on class {args.device_class} met the "
              "budget", file=sys.stderr)
        return 1
    return 0


def _print_rows(rows: list[dict]) -> None:
    def num(v: float | None, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    cells = [["VARIANT", "ACC %", "P95 MS", "P50 MS", "DEVICES", "CHOSEN", "WHY"]]
    cells += [[r["name"], num(None if r["accuracy"] is None else 100 * r["accuracy"], ".2f"),
               num(r["p95_ms"]), num(r["p50_ms"]),
               f"{r['devices_measured']}/{r['devices_expected']}",
               "yes" if r["chosen"] else "-", r["why"]] for r in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(cells[0]))]
    for r in cells:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def add_tune_command(sub: argparse._SubParsersAction, client_args: Callable[..., None],
                     client: Callable[[argparse.Namespace], AdminClient]) -> None:
    t = sub.add_parser(
        "tune", help="measure candidate variants on devices of a class (profile-only, never "
        "served) and write the set to roll out to it",
        description="Offer candidates profile-only to a few online devices of CLASS (their "
        "own desired state plus the candidates, never served), wait for their on-device "
        "profiles, give the devices their own desired state back, and write the chosen set "
        "(the most accurate candidates whose class p95 meets the budget, with the figures) "
        "to a file `prunefleet rollout create --file` takes (docs/hardware.md).")
    client_args(t)
    t.add_argument("--class", dest="device_class", required=True, metavar="CLASS",
                   help="the reported device class (prunefleet classes)")
    t.add_argument("--candidates", type=Path, metavar="DIR_OR_REPORT",
                   help="a prepare output directory or its report.json; its variants must "
                        "be registered (prunefleet variants register)")
    t.add_argument("--variant", action="append", metavar="REF",
                   help="a registered variant (name or sha256) as a candidate too (repeat)")
    t.add_argument("--devices", type=int, default=DEFAULT_DEVICES, metavar="N",
                   help="devices of the class to measure on (default %(default)s)")
    t.add_argument("--budget-ms", type=float, metavar="X",
                   help="latency budget: a candidate's class p95 (median over the devices) "
                        "must be at most X ms (default: no budget)")
    t.add_argument("--max-variants", type=int, default=DEFAULT_MAX_VARIANTS, metavar="K",
                   help="at most K variants in the set (default %(default)s)")
    t.add_argument("--timeout", default="10m", metavar="DURATION",
                   help="how long to wait for the profiles; what arrived by then is "
                        "reported as partial evidence (default %(default)s)")
    t.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
    t.add_argument("--out", type=Path, metavar="FILE",
                   help="where to write the chosen set (default tuned-CLASS.json)")
    t.set_defaults(func=lambda a: _cmd_tune(a, client(a)))
