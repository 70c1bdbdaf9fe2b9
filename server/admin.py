"""The CLI's server and admin subcommands: ``serve``, ``devices``, ``pin``, ``unpin``,
``variants``, ``rollout``, ``telemetry`` and ``simulate``. The admin commands talk to a
running server through its HTTP API (:mod:`.adminclient`), so that server stays the single writer;
``simulate`` plays devices over MQTT (:mod:`.simulator`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from prunefleet.shared.errors import PrunefleetError

from .adminclient import (
    DEFAULT_SERVER,
    AdminClient,
    ApiError,
    UsageError,
    check_id,
    check_server_url,
    find_token,
)
from .errors import DistributionError, ServerError

if TYPE_CHECKING:
    from .serve import ServeOptions  # imported when serve runs (uvicorn is heavy)


def _client(args: argparse.Namespace) -> AdminClient:
    token, source = find_token(args.token, args.token_file)
    return AdminClient(check_server_url(args.server), token, token_source=source)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else \
        f"{s / 3600:.0f}h ago"


def _table(rows: list[list], header: list[str]) -> None:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# -- serve --------------------------------------------------------------------------------------
def serve_options(args: argparse.Namespace) -> ServeOptions:
    """What ``serve`` runs with: the options given on the command line (or by the
    environment), checked here, over the ``--config`` file, checked as a whole, over the
    defaults. :class:`UsageError` for a bad value, before anything starts."""
    from prunefleet.shared.topics import Topics

    from .serve import parse_listen
    from .serverconfig import (
        MIN_SHARE_GROUP_CHARS,
        ServerConfig,
        ServerConfigError,
        load_server_config,
    )

    try:
        if args.listen is not None:
            parse_listen(args.listen)
        if args.prefix is not None:
            Topics(args.prefix)
    except PrunefleetError as e:
        raise UsageError(str(e)) from e
    if args.share_group is not None:
        check_id(args.share_group, "--share-group")
        if len(args.share_group) < MIN_SHARE_GROUP_CHARS:
            # mosquitto 2.0 cannot refuse a device's $share subscription (deploy/mosquitto/acl)
            raise UsageError(f"--share-group must be a secret of {MIN_SHARE_GROUP_CHARS} "
                             "characters at least (e.g. `openssl rand -hex 16`): a device "
                             "that knows the name can take a share of the fleet's telemetry")
    if args.client_id is not None:
        check_id(args.client_id, "--client-id")
    if not ((args.device_rate is None or args.device_rate >= 0)
            and (args.device_burst is None or args.device_burst >= 1)):
        raise UsageError("--device-rate must be 0 (no limit) or more, --device-burst 1 or more")
    if args.ingest_processes is not None and not 0 <= args.ingest_processes <= 64:
        raise UsageError("--ingest-processes must be 0 to 64")
    retention_s = None
    if args.retention:
        from .history import parse_duration

        try:
            retention_s = parse_duration(args.retention)
        except ValueError as e:
            raise UsageError(f"--retention: {e}") from e
        if not retention_s > 0:
            raise UsageError(f"--retention: {args.retention!r} is not more than 0 "
                             "(examples: 30d, 12h)")
    try:
        config = load_server_config(args.config) if args.config else ServerConfig()
    except ServerConfigError as e:
        raise UsageError(str(e)) from e
    return config.serve_options({
        "state_dir": args.state_dir, "broker": args.broker, "db": args.db,
        "listen": args.listen, "keys": args.keys, "prefix": args.prefix,
        "share_group": args.share_group, "client_id": args.client_id,
        "metrics_public": args.metrics_public, "device_rate_per_s": args.device_rate,
        "device_burst": args.device_burst, "retention.older_than": retention_s,
        "ingest_processes": args.ingest_processes,
    })


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    opts = serve_options(args)
    try:
        return serve(opts)
    except DistributionError as e:
        if "cannot reach the broker" not in str(e):
            raise
        raise DistributionError(
            f"{e}: start it, or point --broker (or broker in --config) at a running one "
            "(without either, serve runs an embedded broker)") from e
    except OSError as e:  # the listen address is taken, a directory is not writable, …
        where = f" ({e.filename})" if e.filename else f" (--listen {opts.listen})"
        raise ServerError(f"cannot start the server: {e.strerror or e}{where}") from e


# -- devices ------------------------------------------------------------------------------------
def _cmd_devices(args: argparse.Namespace) -> int:
    if args.group is not None:
        check_id(args.group, "group")
    devs = _client(args).devices(args.group)
    if args.json:
        _print_json(devs)
        return 0
    rows = []
    for d in devs:
        r = d["rollout"]
        phase = "-" if r is None else f"v{r['manifest_version']} {r['phase']}" + (
            f" {100 * r['progress']:.0f}%" if r["phase"] == "downloading" else "")
        groups = ",".join(d["groups"]) or "-"
        if d.get("requested_group"):
            groups += f" (asks {d['requested_group']})"
        rows.append([d["device_id"], "online" if d["online"] else "offline",
                     groups, d["manifest_version"] or "-",
                     d["active_variant"] or "-", len(d["installed"]), phase,
                     _ago(d["last_seen"])])
    _table(rows, ["DEVICE", "STATE", "GROUPS", "MANIFEST", "ACTIVE", "INSTALLED", "ROLLOUT",
                  "SEEN"])
    return 0


def _cmd_devices_groups(args: argparse.Namespace) -> int:
    check_id(args.device, "device id")
    for g in args.groups:
        check_id(g, "group")
    out = _client(args).set_groups(args.device, args.groups)
    if args.json:
        _print_json(out)
    else:
        print(f"{out['device_id']}: groups {', '.join(out['groups']) or '(none)'}")
    return 0


def _cmd_devices_approve(args: argparse.Namespace) -> int:
    for device in args.device:
        check_id(device, "device id")
    client = _client(args)
    devices = list(args.device)
    if args.all:
        devices += [d["device_id"] for d in client.devices()
                    if d.get("requested_group") and d["device_id"] not in devices]
    if not devices:
        raise UsageError("name a device, or pass --all (every device that asks for a group)")
    out = [client.approve_group(d) for d in devices]
    if args.json:
        _print_json(out)
    else:
        for r in out:
            print(f"{r['device_id']}: joined {r['approved']}; groups {', '.join(r['groups'])}")
    return 0


# -- pins ---------------------------------------------------------------------------------------
def _cmd_pin(args: argparse.Namespace) -> int:
    check_id(args.target, "device or group")
    variant = getattr(args, "variant", None)
    if variant is not None:
        check_id(variant, "variant")
    out = _client(args).pin(args.target, variant, group=True if args.group else None)
    if args.json:
        _print_json(out)
        return 0
    what = f"pinned to {variant}" if variant else "unpinned"
    for d in out["devices"]:
        print(f"{d['device_id']}: {what} (desired state v{d['manifest_version']})")
    for d in out["skipped"]:
        print(f"{d['device_id']}: not changed: {d['reason']}")
    return 0


# -- variants -----------------------------------------------------------------------------------
def _cmd_variants_list(args: argparse.Namespace) -> int:
    vs = _client(args).variants()
    if args.json:
        _print_json(vs)
        return 0
    _table([[v["name"], v["sha256"][:12], v["size"], v["chunks"], v["params"], v["macs"],
             "-" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f}",
             v["technique"]] for v in vs],
           ["NAME", "SHA256", "BYTES", "CHUNKS", "PARAMS", "MACS", "ACC %", "TECHNIQUE"])
    return 0


def _register_report(args: argparse.Namespace) -> int:
    """Register every variant of a ``prunefleet prepare`` report as ``prepare`` left it: its
    measured figures, and the golden pair and tolerance it chose (the server checks them)."""
    from prunefleet.shared.chunks import sha256_file

    from .registry import VariantRegistration, registration_from_report

    try:
        entries = json.loads(args.file.read_text())["variants"]
        if not isinstance(entries, list) or not all(isinstance(v, dict) for v in entries):
            raise TypeError("'variants' is not a list of entries")
        files = [args.file.parent / v["file"] for v in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"prunefleet: {args.file}: not a prepare report: {e}", file=sys.stderr)
        return 2
    # Every entry is checked before the first upload: a bad report changes nothing.
    regs: list[tuple[Path, VariantRegistration]] = []
    for v, path in zip(entries, files, strict=True):
        try:
            digest = sha256_file(path)
            if v.get("sha256") not in (None, digest):
                raise ValueError(f"{v['file']} changed since the report was written")
            regs.append((path, registration_from_report(v, sha256=digest,
                                                         chunk_bytes=args.chunk_bytes)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"prunefleet: {args.file}: variant {v.get('name')!r}: {e}", file=sys.stderr)
            return 2
    client = _client(args)
    done = [client.register_variant(path, **reg.model_dump(mode="json", exclude={"sha256"},
                                                            exclude_none=True))
            for path, reg in regs]
    if args.json:
        _print_json(done)
    else:
        for r in done:
            print(f"registered {r['name']} ({r['sha256'][:12]}…, {r['size']} bytes, "
                  f"{r['chunks']} chunks published)")
    return 0


def _policy_overrides(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs as JSON values (numbers, true/false, null), checked here as the
    server and the agents check them, so a bad value costs one line and no request."""
    from prunefleet.shared.policy import PolicyConfig, PolicyOverrideError, apply_overrides

    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--policy takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            raise UsageError(f"--policy {key}: {raw!r} is not a number, true, false or "
                             "null") from None
    settings = sorted(PolicyConfig.model_fields)
    unknown = sorted(set(out) - set(settings))
    if unknown:
        raise UsageError(f"invalid policy override {unknown[0]!r}: not a policy setting "
                         f"(settings: {', '.join(settings)})")
    try:
        apply_overrides(PolicyConfig(), out)
    except PolicyOverrideError as e:
        # "KEY: message", or "policy: message" for a rule between settings
        key, _, msg = str(e).partition(": ")
        where = "" if key == "policy" else f" {key}"
        raise UsageError(f"invalid policy override{where}: "
                         f"{msg.removeprefix('Value error, ')}") from None
    return out


def _cmd_variants_register(args: argparse.Namespace) -> int:
    if args.file.suffix == ".json":
        return _register_report(args)
    if args.name is None or args.macs is None:
        print("prunefleet: registering an ONNX file needs --name and --macs "
              "(or give a prepare report.json)", file=sys.stderr)
        return 2
    meta: dict = {"name": args.name, "macs": args.macs, "technique": args.technique}
    if args.params is not None:
        meta["params"] = args.params
    if args.input_shape:
        meta["input_shape"] = [int(x) for x in args.input_shape.split(",")]
    if args.num_classes is not None:
        meta["num_classes"] = args.num_classes
    if args.accuracy is not None:
        meta["accuracy"] = args.accuracy
    if args.latency_ms is not None:
        meta["latency_ms"] = args.latency_ms
    if args.chunk_bytes is not None:
        meta["chunk_bytes"] = args.chunk_bytes
    v = _client(args).register_variant(args.file, **meta)
    if args.json:
        _print_json(v)
    else:
        print(f"registered {v['name']} ({v['sha256'][:12]}…, {v['size']} bytes, "
              f"{v['chunks']} chunks published)")
    return 0


# -- rollouts -----------------------------------------------------------------------------------
def _rollout_line(r: dict) -> list:
    c = r["counts"]
    t = r["target"]
    target = {"devices": lambda: ",".join(t["devices"][:3]) + ("…" if len(t["devices"]) > 3
                                                                  else ""),
              "group": lambda: f"group {t['group']}", "fleet": lambda: "fleet",
              "class": lambda: f"class {t.get('device_class')}"}[t["kind"]]()
    variants = ",".join(v["name"] for v in r["variants"])
    if (r.get("config") or {}).get("profile_only"):
        variants += " (profile only)"  # a tune's: offered to be measured, never served
    return [f"#{r['id']}", r["status"], r["stage"], target, variants,
            f"{c['succeeded']}/{c['total']}", c["failed"], c["pending"] + c["waiting"]]


_HEADER = ["ID", "STATUS", "STAGE", "TARGET", "VARIANTS", "OK", "FAILED", "PENDING"]


def _fig(v: float | None, limit: float | None, fmt: str = ".3f") -> str:
    shown = "-" if v is None else format(v, fmt)
    return shown if limit is None else f"{shown} ({format(limit, 'g')})"


def _print_waves(r: dict) -> None:
    """Each judged wave's figures against its gate (the gate's limit in brackets)."""
    rows = []
    for w in r.get("waves") or []:
        variants = w["variants"] or {"-": None}
        for name, v in variants.items():
            if v is None:
                rows.append([w["wave"], w["verdict"], w["devices"], w["reporting"], name,
                             0, "-", "-", "-", "-"])
                continue
            rows.append([w["wave"], w["verdict"], w["devices"], w["reporting"], name,
                         f"{v['samples']} ({v['min_requests']})",
                         _fig(v["agreement"], v["min_agreement"]),
                         _fig(v["error_rate"], v["max_error_rate"]),
                         _fig(v["p95_ratio"], v["max_p95_ratio"], ".2f"),
                         _fig(v["divergence"], None)])
    if rows:
        print()
        _table(rows, ["WAVE", "VERDICT", "DEVICES", "REPORTING", "VARIANT", "SAMPLES (MIN)",
                      "AGREEMENT (MIN)", "ERRORS (MAX)", "P95 RATIO (MAX)", "DIVERGENCE"])
    for w in r.get("waves") or []:
        if w["verdict"] != "pass":
            print(f"wave {w['wave']}: {w['reason']}")


def _print_rollout(r: dict) -> None:
    _table([_rollout_line(r)], _HEADER)
    if r.get("reason"):
        print(f"\n{r['reason']}")
    _print_waves(r)
    devices = r.get("devices") or []
    if devices:
        print()
        _table([[d["device_id"], "online" if d["online"] else "offline", d["stage"] or "-",
                 d["offered_version"] or "-", d["phase"] or "-",
                 f"{100 * d['progress']:.0f}%", (d["reason"] or "")[:60]] for d in devices],
               ["DEVICE", "STATE", "STAGE", "MANIFEST", "PHASE", "PROGRESS", "REASON"])


def _rollout_file(args: argparse.Namespace) -> None:
    """Fill what the command line left out from ``--file`` (TOML, or the JSON `prunefleet
    tune` writes): variants, target (devices, group, class or fleet = true), waves,
    on_fail, pin, and a [gate] table."""
    import tomllib

    try:
        text = Path(args.file).read_text()
        doc = json.loads(text) if str(args.file).endswith(".json") else tomllib.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a table of settings")
    except (OSError, ValueError) as e:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise UsageError(f"cannot read the rollout file {args.file}: {e}") from e
    doc.pop("tune", None)  # a tune's figures: what the choice was made on
    unknown = set(doc) - {"variants", "devices", "group", "class", "fleet", "waves", "on_fail",
                          "pin", "gate"}
    gate = doc.get("gate", {})
    unknown |= {f"gate.{k}" for k in set(gate) - {
        "min_agreement", "max_p95_ratio", "max_error_rate", "min_requests", "observe",
        "sample_share", "min_device_share"}}
    if unknown:
        raise UsageError(f"{args.file}: unknown key(s) {', '.join(sorted(unknown))}")
    args.variant = args.variant or doc.get("variants")
    if not (args.device or args.group or args.device_class or args.fleet):
        args.device, args.group = doc.get("devices"), doc.get("group")
        args.device_class, args.fleet = doc.get("class"), bool(doc.get("fleet"))
    if args.waves is None and "waves" in doc:
        args.waves = ",".join(str(w) for w in doc["waves"])
    args.on_fail = args.on_fail or doc.get("on_fail")
    args.pin = args.pin or doc.get("pin")
    for key in ("min_agreement", "max_p95_ratio", "max_error_rate", "min_requests",
                "sample_share", "min_device_share"):
        if getattr(args, key, None) is None and key in gate:
            setattr(args, key, gate[key])
    if args.observe is None and "observe" in gate:
        args.observe = str(gate["observe"])


def _gate(args: argparse.Namespace) -> dict:
    from .history import parse_duration

    gate = {k: getattr(args, k, None) for k in (
        "min_agreement", "max_p95_ratio", "max_error_rate", "min_requests", "sample_share",
        "min_device_share")}
    if args.observe is not None:
        try:
            gate["observe_s"] = parse_duration(args.observe)
        except ValueError as e:
            raise UsageError(f"--observe: {e}") from e
    return {k: v for k, v in gate.items() if v is not None}


def _cmd_rollout_create(args: argparse.Namespace) -> int:
    if args.file:
        _rollout_file(args)
    if not args.variant:
        raise UsageError("name at least one --variant (or variants in --file)")
    if not (args.device or args.group or args.device_class or args.fleet):
        raise UsageError("name a target: --device, --group, --class or --fleet (or in --file)")
    for device in args.device or []:
        check_id(device, "device id")
    if args.group is not None:
        check_id(args.group, "group")
    if args.device_class is not None:
        check_id(args.device_class, "device class")
    for name in [*args.variant, *([args.pin] if args.pin else [])]:
        check_id(name, "variant (name or sha256)")
    if args.device:
        target = {"kind": "devices", "devices": args.device}
    elif args.group:
        target = {"kind": "group", "group": args.group}
    elif args.device_class:
        target = {"kind": "class", "device_class": args.device_class}
    else:
        target = {"kind": "fleet"}
    config = {k: v for k, v in {
        "canary_percent": args.canary_percent, "canary_min_devices": args.canary_min,
        "success_threshold": args.success_threshold,
        "failure_threshold": args.failure_threshold, "success_phase": args.success_phase,
        "canary_timeout_s": args.canary_timeout, "device_timeout_s": args.device_timeout,
    }.items() if v is not None}
    if args.waves is not None:
        try:
            config["waves"] = [float(w) for w in str(args.waves).split(",") if w.strip()]
        except ValueError:
            raise UsageError(f"--waves: {args.waves!r} is not a list of percents such as "
                              "1,10,50,100") from None
    gate = _gate(args)
    if gate:
        config["gate"] = gate
    if args.on_fail:
        config["on_fail"] = args.on_fail
    body = {"target": target, "variants": args.variant, "config": config,
            "supersede": args.supersede}
    if args.pin:
        body["pinned_variant"] = args.pin
    if args.policy:
        body["policy"] = _policy_overrides(args.policy)
    try:
        r = _client(args).create_rollout(body)
    except ApiError as e:
        # The API's word for the flag is its JSON field; name the flag on the command line.
        if e.status == 409 and "pass supersede" in str(e):
            raise ApiError(str(e).replace("pass supersede", "pass --supersede"), e.status,
                           e.details) from None
        raise
    if args.json:
        _print_json(r)
    else:
        print(f"created rollout #{r['id']}")
        _print_rollout(r)
    return 0


def _cmd_rollout_list(args: argparse.Namespace) -> int:
    rs = _client(args).rollouts()
    if args.json:
        _print_json(rs)
    else:
        _table([_rollout_line(r) for r in rs], _HEADER)
    return 0


def _cmd_rollout_status(args: argparse.Namespace) -> int:
    client = _client(args)
    r = client.rollout(args.id)
    while True:
        if args.json:
            _print_json(r)
        else:
            _print_rollout(r)
        if not args.watch or r["status"] not in ("active", "paused"):
            return 0
        time.sleep(args.watch)
        r = client.rollout(args.id)
        print(f"\n-- {time.strftime('%H:%M:%S')} --")


def _cmd_rollout_action(args: argparse.Namespace) -> int:
    r = _client(args).rollout_action(args.id, args.action)
    if args.json:
        _print_json(r)
    else:
        _print_rollout(r)
    return 0


def _cmd_devices_show(args: argparse.Namespace) -> int:
    check_id(args.device, "device id")
    client = _client(args)
    if args.format in ("csv", "jsonl") and not args.json:
        sys.stdout.write(client.device_history(args.device, since=args.since, until=args.until,
                                               resolution=args.resolution, fmt=args.format))
        return 0
    h = client.device_history(args.device, since=args.since, until=args.until,
                              resolution=args.resolution)
    if args.json:
        _print_json(h)
        return 0
    print(f"{h['device_id']}: {len(h['buckets'])} buckets of {h['resolution_s']:g} s from "
          f"{_when(h['since'])} to {_when(h['until'])}")
    cols = ["time", "batt%", "cpu%", "temp", "reqs", "p50 ms", "p95 ms", "energy J",
            "active", "switches", "shadow"]
    rows: list[list] = []
    for b in h["buckets"]:
        rows.append([_when(b["t"]), _num(b["battery_percent"]), _num(b["cpu_percent"]),
                     _num(b["temperature_c"]), b["requests"], _num(b["latency_ms_p50"], 3),
                     _num(b["latency_ms_p95"], 3), _num(b["energy_j"], 3),
                     b["active_variant"] or "-", b["switches"], _num(b["shadow_agreement"], 3)])
    _table(rows, cols)
    if h["switches"]:
        print("\nswitches:")
        for sw in h["switches"]:
            print(f"  {_when(sw['ts'])}  {sw['from_variant'] or '-'} → {sw['to_variant']}  "
                  f"({sw['reason']})")
    return 0


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _cmd_devices_delete(args: argparse.Namespace) -> int:
    check_id(args.device, "device id")
    out = _client(args).delete_device(args.device)
    if args.json:
        _print_json(out)
    else:
        print(f"deleted {args.device}: its store rows and retained broker topics are gone")
    return 0


def _cmd_telemetry_prune(args: argparse.Namespace) -> int:
    from .history import parse_duration

    try:
        older = parse_duration(args.older_than)
    except ValueError as e:
        raise UsageError(f"--older-than: {e}") from e
    out = _client(args).prune_telemetry(older)
    if args.json:
        _print_json(out)
    else:
        d = out["deleted"]
        print(f"deleted {d['telemetry']} telemetry batches and {d['events']} events from "
              f"before {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(out['before']))}")
    return 0


def _cmd_telemetry(args: argparse.Namespace) -> int:
    since = time.time() - args.since_s if args.since_s else 0.0
    s = _client(args).telemetry_summary(since)
    if args.json:
        _print_json(s)
        return 0
    print(f"{s['devices']} devices, {s['online']} online, {s['batches']} telemetry batches")
    _table([[n, v["devices"], v["requests"], v["errors"],
             "-" if v["accuracy"] is None else f"{100 * v['accuracy']:.2f}",
             "-" if v["latency_ms_p50_mean"] is None else f"{v['latency_ms_p50_mean']:.3f}"]
            for n, v in s["variants"].items()],
           ["VARIANT", "DEVICES", "REQUESTS", "ERRORS", "ACC %", "P50 MS"])
    return 0


# -- simulate -----------------------------------------------------------------------------------
def _cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    import threading

    from .simulator import SimOptions, SimulatorError, run

    opts = SimOptions(
        broker_url=args.broker, devices=args.devices, group=args.group, prefix=args.prefix,
        id_prefix=args.id_prefix, keys=args.keys, duration_s=args.duration,
        fail_share=args.fail_share, offline_share=args.offline_share,
        telemetry_interval_s=args.telemetry_interval, seed=args.seed,
        download=not args.no_download, state_dir=args.state_dir, workers=args.workers,
        status_interval_s=args.status_interval, telemetry_max_in_flight=args.in_flight,
    )
    try:
        opts.check()  # one clear line for a bad option, before anything connects
    except SimulatorError as e:
        raise UsageError(str(e)) from e
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # With --json the status rows go to stderr and stdout holds only the summary.
        summary = run(opts, stop, sys.stderr if args.json else sys.stdout)
    except SimulatorError as e:
        raise SimulatorError(f"{e}: check that the broker runs there and that --broker "
                             "is the address devices use") from e
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        _print_json(dataclasses.asdict(summary))
    return 0


# -- parser -------------------------------------------------------------------------------------
def _client_args(p: argparse.ArgumentParser, nested: bool = False) -> None:
    """The options every API command takes. ``nested``: a subcommand of a command that has
    them too; SUPPRESS keeps its defaults from overwriting what was given before it."""

    def d(value):
        return argparse.SUPPRESS if nested else value

    p.add_argument("--server", default=d(os.environ.get("PRUNEFLEET_SERVER", DEFAULT_SERVER)),
                   help=f"API base URL (default $PRUNEFLEET_SERVER or {DEFAULT_SERVER})")
    p.add_argument("--token", default=d(None),
                   help="API bearer token (default $PRUNEFLEET_TOKEN)")
    p.add_argument("--token-file", type=Path, default=d(None),
                   help="file holding the token (default .prunefleet/server/api-token)")
    p.add_argument("--json", action="store_true", default=d(False),
                   help="print the API's JSON")


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="run the server: MQTT distribution, rollouts, HTTP API",
                       description="Run the server. Settings come from the options, then "
                       "the --config file, then the defaults shown (docs/operations.md; "
                       "deploy/server.toml is an example file).")
    s.add_argument("--config", type=Path, metavar="FILE",
                   help="a TOML file with these settings and [retention]; the options "
                   "given here win over it")
    s.add_argument("--broker", metavar="URL",
                   help="mqtt://host:port of the broker (default: embedded amqtt on loopback)")
    s.add_argument("--db", metavar="URL",
                   help="SQLAlchemy URL, e.g. postgresql://user@host/db "
                   "(default: SQLite in the state directory)")
    s.add_argument("--state-dir", type=Path,
                   help="API token, uploaded models, SQLite store (default .prunefleet/server)")
    s.add_argument("--listen", metavar="HOST:PORT", help="the HTTP API (default 127.0.0.1:8080)")
    s.add_argument("--keys", type=Path, metavar="DIR",
                   help="signing key directory, as for `keys init` (default .prunefleet/keys)")
    s.add_argument("--prefix", help="MQTT topic prefix (default prunefleet)")
    s.add_argument("--share-group", default=os.environ.get("PRUNEFLEET_SHARE_GROUP"),
                   help="ingest through $share/GROUP/… (several servers); a secret, as "
                        "devices must not join it (default $PRUNEFLEET_SHARE_GROUP)")
    s.add_argument("--client-id", help="MQTT client id; give each server its own (default: "
                   "random, kept in STATE_DIR/client-id, so a restart resumes its session)")
    s.add_argument("--device-rate", type=float, metavar="PER_S",
                   help="messages per second each device may send; more are dropped and "
                   "counted (default 20; 0: no limit)")
    s.add_argument("--device-burst", type=float, metavar="N",
                   help="messages a device may send at once (default 200)")
    s.add_argument("--ingest-processes", type=int, metavar="N",
                   help="check and store device messages in N worker processes (default 0: "
                        "on a thread of this one); for a server whose one core is the limit")
    s.add_argument("--metrics-public", action=argparse.BooleanOptionalAction,
                   help="serve GET /metrics without the bearer token (default: token needed)")
    s.add_argument("--retention", metavar="DURATION",
                   default=os.environ.get("PRUNEFLEET_RETENTION"),
                   help="delete telemetry and events older than this, e.g. 30d, hourly "
                        "(default $PRUNEFLEET_RETENTION, else keep everything)")
    s.set_defaults(func=_cmd_serve)

    d = sub.add_parser("devices", help="list devices (or set their groups)")
    _client_args(d)
    d.add_argument("--group", help="only devices in this group")
    d.set_defaults(func=_cmd_devices)  # `prunefleet devices` alone lists
    ds = d.add_subparsers(dest="devices_command")
    dl = ds.add_parser("list", help="list devices (the default)")
    _client_args(dl, nested=True)
    dl.add_argument("--group", default=argparse.SUPPRESS, help="only devices in this group")
    dl.set_defaults(func=_cmd_devices)
    dg = ds.add_parser("set-groups", help="set the groups of a device (registers it if new)")
    _client_args(dg, nested=True)
    dg.add_argument("device")
    dg.add_argument("groups", nargs="*", help="group names (none: remove from all)")
    dg.set_defaults(func=_cmd_devices_groups)
    da = ds.add_parser("approve", help="grant the group a device asks for (its agent's "
                       "configured group; until then it is in no group)")
    _client_args(da, nested=True)
    da.add_argument("device", nargs="*", help="device ids")
    da.add_argument("--all", action="store_true",
                    help="every device that asks for a group")
    da.set_defaults(func=_cmd_devices_approve)
    dh = ds.add_parser("show", help="one device's telemetry over time: battery, CPU, "
                       "temperature, requests, latency, active variant, switches, shadow "
                       "agreement")
    _client_args(dh, nested=True)
    dh.add_argument("device")
    dh.add_argument("--since", default="24h",
                    help="start: a duration before now (24h, 30m), ISO 8601 or epoch seconds "
                         "(default 24h)")
    dh.add_argument("--until", help="end (default now)")
    dh.add_argument("--resolution", help="bucket width: 60, 5m, 1h (default: at most 240 "
                    "buckets over the range)")
    dh.add_argument("--format", choices=["table", "csv", "jsonl"], default="table",
                    help="table (default), or an export: csv or jsonl")
    dh.set_defaults(func=_cmd_devices_show)
    dd = ds.add_parser("delete", help="decommission an offline device: its store rows and "
                       "retained broker topics are removed (revoke it first)")
    _client_args(dd, nested=True)
    dd.add_argument("device")
    dd.set_defaults(func=_cmd_devices_delete)
    from .provisioncli import add_device_commands

    add_device_commands(ds, _client_args)  # provision, revoke
    from .profilecli import add_profile_commands

    add_profile_commands(sub, ds, _client_args, _client)  # devices profile, classes
    from .tune import add_tune_command

    add_tune_command(sub, _client_args, _client)  # tune --class

    for name, helptext in (("pin", "serve one variant on a device or every device of a "
                                   "group (a new signed desired state)"),
                           ("unpin", "let the policy choose again on a device or group")):
        pn = sub.add_parser(name, help=helptext)
        _client_args(pn)
        pn.add_argument("target", metavar="DEVICE_OR_GROUP",
                        help="a device id, or a group (when no device has that id)")
        if name == "pin":
            pn.add_argument("variant", metavar="VARIANT",
                            help="a variant of the device's current desired state")
        pn.add_argument("--group", action="store_true",
                        help="TARGET is a group even if a device has that id")
        pn.set_defaults(func=_cmd_pin)

    v = sub.add_parser("variants", help="list or register model variants")
    vs = v.add_subparsers(dest="variants_command", required=True)
    vl = vs.add_parser("list", help="registered variants")
    _client_args(vl)
    vl.set_defaults(func=_cmd_variants_list)
    vr = vs.add_parser("register", help="upload an ONNX file and publish it as a variant")
    _client_args(vr)
    vr.add_argument("file", type=Path,
                    help="an ONNX file, or a report.json from `prunefleet prepare` (all of "
                         "its variants, with their measured figures)")
    vr.add_argument("--name", help="variant name (ONNX file only)")
    vr.add_argument("--macs", type=int,
                    help="multiply-accumulates per input (ONNX file only)")
    vr.add_argument("--params", type=int, help="parameters (default: counted from the file)")
    vr.add_argument("--input-shape", help="e.g. 1,1,8,8 (default: read from the file)")
    vr.add_argument("--num-classes", type=int, help="(default: read from the file)")
    vr.add_argument("--accuracy", type=float, help="measured top-1 accuracy, 0..1")
    vr.add_argument("--latency-ms", type=float, help="measured latency")
    vr.add_argument("--technique", default="none", help="e.g. structured, int8")
    vr.add_argument("--chunk-bytes", type=int, help="chunk size on the wire (default 64 KiB)")
    vr.set_defaults(func=_cmd_variants_register)

    r = sub.add_parser("rollout", help="staged rollouts of variants to devices")
    rs = r.add_subparsers(dest="rollout_command", required=True)
    rc = rs.add_parser("create", help="offer variants to devices, a group, or the fleet")
    _client_args(rc)
    rc.add_argument("--variant", action="append",
                    help="registered variant name or sha256 (repeat for several)")
    tg = rc.add_mutually_exclusive_group()
    tg.add_argument("--device", action="append", help="a device id (repeat for several)")
    tg.add_argument("--group", help="every device in this group")
    tg.add_argument("--class", dest="device_class", metavar="CLASS",
                    help="every device that reports this device class (prunefleet classes)")
    tg.add_argument("--fleet", action="store_true", help="every device the server knows")
    rc.add_argument("--pin", metavar="VARIANT", help="pin devices to this variant")
    rc.add_argument("--policy", metavar="KEY=VALUE", action="append",
                    help="override an agent policy setting, e.g. battery_low_percent=40 "
                         "(repeat for several; checked by the server)")
    rc.add_argument("--canary-percent", type=float, help="share offered first (default 10)")
    rc.add_argument("--canary-min", type=int, help="at least this many canaries (default 1)")
    rc.add_argument("--success-threshold", type=float,
                    help="share of canaries that must succeed to promote (default 1.0)")
    rc.add_argument("--failure-threshold", type=float,
                    help="halt once the failed share of offered devices is above (default 0.1)")
    rc.add_argument("--success-phase", choices=["installed", "active"],
                    help="what counts as success (default installed)")
    rc.add_argument("--canary-timeout", type=float, help="seconds (default 900)")
    rc.add_argument("--device-timeout", type=float, help="seconds (default 1800)")
    rc.add_argument("--supersede", action="store_true",
                    help="take devices over from unfinished rollouts")
    rc.add_argument("--file", metavar="TOML",
                    help="a rollout file (variants, target, waves, [gate]), or the JSON "
                         "`prunefleet tune` writes; flags override it")
    rc.add_argument("--waves", metavar="PERCENTS",
                    help="gated waves instead of canary and rest: cumulative percents of the "
                         "target, e.g. 1,10,50,100")
    rc.add_argument("--min-agreement", type=float,
                    help="gate: top-1 agreement with the reference (default 0.97)")
    rc.add_argument("--max-p95-ratio", type=float,
                    help="gate: latency p95 over the device profile's (default 1.3)")
    rc.add_argument("--max-error-rate", type=float, help="gate: default 0.01")
    rc.add_argument("--min-requests", type=int,
                    help="gate: shadow samples per variant in a wave before it is judged "
                         "(default 200)")
    rc.add_argument("--min-device-share", type=float,
                    help="gate: share of a wave's devices that must report (default 1.0)")
    rc.add_argument("--sample-share", type=float,
                    help="share of live requests replayed for shadow evaluation (default 0.05)")
    rc.add_argument("--observe", metavar="DURATION",
                    help="how long a wave may gather evidence, e.g. 10m (default 10m)")
    rc.add_argument("--on-fail", choices=["rollback", "hold"],
                    help="a failing wave's devices: roll back (default) or hold")
    rc.set_defaults(func=_cmd_rollout_create)
    rl = rs.add_parser("list", help="all rollouts")
    _client_args(rl)
    rl.set_defaults(func=_cmd_rollout_list)
    rst = rs.add_parser("status", help="one rollout, per device")
    _client_args(rst)
    rst.add_argument("id", type=int)
    rst.add_argument("--watch", type=float, nargs="?", const=2.0, default=None,
                     metavar="SECONDS", help="show it again every SECONDS (2) until it "
                     "stops being active")
    rst.set_defaults(func=_cmd_rollout_status)
    for action, helptext in (("pause", "stop offering to more devices"),
                             ("resume", "continue a paused or halted rollout"),
                             ("rollback", "give devices their previous desired state")):
        ra = rs.add_parser(action, help=helptext)
        _client_args(ra)
        ra.add_argument("id", type=int)
        ra.set_defaults(func=_cmd_rollout_action, action=action)

    sm = sub.add_parser("simulate", help="simulated devices against a broker and server "
                        "(rollouts, dashboards, ingest at scale; no ONNX Runtime)")
    sm.add_argument("--broker", metavar="URL", required=True,
                    help="mqtt://host:port of the server's broker (without a user in the "
                         "URL each device connects with its device id as user name)")
    sm.add_argument("--devices", type=int, required=True, metavar="N",
                    help="how many devices to simulate")
    sm.add_argument("--group", help="the group in each device's own configuration (its "
                                    "group desired topic is followed too)")
    sm.add_argument("--prefix", default="prunefleet",
                    help="MQTT topic prefix, as the server's (%(default)s)")
    sm.add_argument("--id-prefix", default="sim",
                    help="device ids are ID_PREFIX-0000, … (%(default)s)")
    sm.add_argument("--keys", type=Path, default=Path(".prunefleet/keys"), metavar="DIR",
                    help="the server's key directory; devices pin its public.pem "
                         "(default %(default)s)")
    sm.add_argument("--duration", type=float, metavar="S",
                    help="stop after S seconds (default: until SIGINT/SIGTERM)")
    sm.add_argument("--fail-share", type=float, default=0.0, metavar="F",
                    help="share of devices whose installs fail (chosen by --seed)")
    sm.add_argument("--offline-share", type=float, default=0.0, metavar="F",
                    help="share of devices that go offline and come back during the run")
    sm.add_argument("--telemetry-interval", type=float, default=10.0, metavar="S",
                    help="seconds per telemetry batch (%(default)s)")
    sm.add_argument("--in-flight", type=int, default=10, metavar="N",
                    help="each device's telemetry batches sent and not yet confirmed stored, "
                         "the agent's telemetry_max_in_flight (%(default)s)")
    sm.add_argument("--seed", type=int, default=0, help="makes the run repeatable (0)")
    sm.add_argument("--no-download", action="store_true",
                    help="verify manifests but do not fetch chunks (very large fleets)")
    sm.add_argument("--state-dir", type=Path,
                    help="per-device state (downloads); default a temporary directory")
    sm.add_argument("--workers", type=int, default=0,
                    help="threads stepping the devices (default: CPU cores, at most 4)")
    sm.add_argument("--status-interval", type=float, default=10.0, metavar="S",
                    help="seconds between status rows (%(default)s)")
    sm.add_argument("--json", action="store_true",
                    help="status rows to stderr; the end summary as JSON on stdout")
    sm.set_defaults(func=_cmd_simulate)

    t = sub.add_parser("telemetry", help="fleet-wide telemetry summary")
    _client_args(t)
    t.add_argument("--since-s", type=float, help="only the last N seconds")
    t.set_defaults(func=_cmd_telemetry)
    ts = t.add_subparsers(dest="telemetry_command")
    tp = ts.add_parser("prune", help="delete telemetry and events older than a duration")
    _client_args(tp, nested=True)
    tp.add_argument("--older-than", required=True, metavar="DURATION",
                    help="e.g. 30d, 12h")
    tp.set_defaults(func=_cmd_telemetry_prune)
