"""The CLI's commands for what devices measured: ``devices profile ID`` (a device's facts
and on-device profiles; ``--refresh``, or ``--group G --refresh``, asks for them to be
measured again) and ``classes`` (profiles aggregated per device class)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from .adminclient import AdminClient, UsageError, check_id


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _table(rows: list[list], header: list[str]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _median(fig: dict | None, digits: int = 3) -> str:
    """``median [p25-p75]`` of one aggregated figure."""
    if not fig:
        return "-"
    if fig["n"] == 1:
        return _num(fig["median"], digits)
    return f"{fig['median']:.{digits}f} [{fig['p25']:.{digits}f}-{fig['p75']:.{digits}f}]"


def _when(ts: float | None) -> str:
    """A device's measurement time, UTC, to the second ("-" when it did not say)."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _cmd_refresh(args: argparse.Namespace, client: AdminClient) -> int:
    if bool(args.group) == bool(args.device):
        raise UsageError("devices profile --refresh: give a device id or --group, not both")
    target = args.group or args.device
    check_id(target, "group" if args.group else "device id")
    out = client.refresh_profiles(target, group=bool(args.group))
    if args.json:
        _print_json(out)
        return 0
    for d in out["devices"]:
        print(f"{d['device_id']}: asked to profile its variants again "
              f"(desired state v{d['manifest_version']}, re-profile {d['reprofile']})")
    for d in out["skipped"]:
        print(f"{d['device_id']}: skipped: {d['reason']}")
    if out["devices"]:
        print("new profiles show here as they arrive (MEASURED: when the device measured)")
    return 0


def _cmd_devices_profile(args: argparse.Namespace, client: AdminClient) -> int:
    if args.refresh:
        return _cmd_refresh(args, client)
    if args.group or not args.device:
        raise UsageError("devices profile: give a device id (--group goes with --refresh)")
    check_id(args.device, "device id")
    out = client.device_profile(args.device)
    if args.json:
        _print_json(out)
        return 0
    f = out["facts"]
    if f is None:
        print(f"{out['device_id']}: no facts reported yet")
    else:
        print(f"{out['device_id']}: class {f['device_class']}; {f['arch']}, "
              f"{f.get('cpu_model') or 'unknown CPU'}, {f['cores']} cores, "
              f"{f.get('memory_mb') or '?'} MB; ISA {', '.join(f.get('isa') or []) or '-'}; "
              f"onnxruntime {f.get('ort_version') or '-'} "
              f"({', '.join(f.get('providers') or []) or '-'}); "
              f"active power {_num(f.get('active_power_w'), 2)} W/core")
    if not out["profiles"]:
        print("no profiles yet (the agent profiles each variant after installing it)")
        return 0
    active, candidates = out.get("active_variant"), set(out.get("profile_only") or [])

    def role(name: str) -> str:
        return "active" if name == active else (
            "profile-only" if name in candidates else "installed")

    _table([[n, role(n), p["sha256"][:12], _num(p["latency_ms_p50"]),
             _num(p["latency_ms_p95"]),
             _num(p["cpu_ms"]), _num(p.get("memory_mb"), 1), _num(p["energy_mj"]),
             p["energy_source"], p["runs"], p["threads"], _when(p.get("ts"))]
            for n, p in sorted(out["profiles"].items())],
           ["VARIANT", "ROLE", "SHA256", "P50 MS", "P95 MS", "CPU MS", "MEM MB", "ENERGY MJ",
            "SOURCE", "RUNS", "THREADS", "MEASURED"])
    return 0


def _cmd_classes(args: argparse.Namespace, client: AdminClient) -> int:
    out = client.classes()
    if args.json:
        _print_json(out)
        return 0
    classes = out["classes"]
    if not classes:
        print("no device has reported its facts yet")
        return 0
    rows = []
    for name, c in classes.items():
        if not c["variants"]:
            rows.append([name, c["devices"], "-", 0, "-", "-", "-", "-"])
        for v in sorted(c["variants"].values(), key=lambda v: v["name"]):
            rows.append([name, c["devices"], v["name"], v["devices"],
                         _median(v["latency_ms_p50"]), _median(v["latency_ms_p95"]),
                         _median(v["energy_mj"]), ",".join(v["energy_sources"])])
    _table(rows, ["CLASS", "DEVICES", "VARIANT", "PROFILED", "P50 MS [IQR]", "P95 MS [IQR]",
                  "ENERGY MJ [IQR]", "SOURCES"])
    return 0


def add_profile_commands(sub: argparse._SubParsersAction, devices: argparse._SubParsersAction,
                         client_args: Callable[..., None],
                         client: Callable[[argparse.Namespace], AdminClient]) -> None:
    """``devices profile`` under ``devices``' subcommands, ``classes`` at the top."""
    dp = devices.add_parser("profile", help="a device's facts and its on-device profile "
                            "of each installed variant")
    client_args(dp, nested=True)
    dp.add_argument("device", nargs="?", help="device id")
    dp.add_argument("--refresh", action="store_true",
                    help="ask the device (or --group) to profile every installed variant "
                    "again, through a new signed desired state (after a firmware or ONNX "
                    "Runtime update, a new cooling, …)")
    dp.add_argument("--group", help="with --refresh: every device of this group")
    dp.set_defaults(func=lambda a: _cmd_devices_profile(a, client(a)))
    c = sub.add_parser("classes", help="device classes: variant profiles aggregated per class "
                       "(count, median, quartiles)")
    client_args(c)
    c.set_defaults(func=lambda a: _cmd_classes(a, client(a)))
