"""``prunefleet``: the server and admin command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from prunefleet.shared.errors import PrunefleetError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        args.work_dir, broker_url=args.broker, agents=args.agents, timeout_s=args.timeout
    )


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from .keys import load_or_create

    existed = (args.dir / "signing.pem").exists()
    key = load_or_create(args.dir)
    print(f"{'existing' if existed else 'new'} signing key {key.keyid}")
    print(f"public key for agents: {args.dir / 'public.pem'}")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from .keys import rotate

    ring = rotate(args.dir)
    assert ring.previous is not None  # rotate() always keeps the old key as previous
    print(f"new signing key {ring.current.keyid}; previous {ring.previous.keyid} kept")
    print(f"1. give agents the new public key too: trusted_keys = [old, "
          f"\"{args.dir / 'public.pem'}\"]")
    print("2. a running `prunefleet serve` picks the change up and signs with both keys")
    print("3. once every agent pins the new key: prunefleet keys retire")
    return 0


def _cmd_keys_retire(args: argparse.Namespace) -> int:
    from .keys import retire_previous

    old = retire_previous(args.dir)
    if old is None:
        print("no previous key: no rotation in progress")
        return 1
    print(f"retired previous key {old.keyid}; manifests carry the current key only")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import check_recipe, load_recipe, prepare

    recipe = load_recipe(args.recipe)
    resolved = check_recipe(recipe)  # fails fast: factory, checkpoint, shape, data, export
    result = prepare(recipe, args.out, force=args.force, progress=sys.stderr.isatty(),
                     resolved=resolved)
    if result.cached:
        print(f"{args.out}: up to date (same recipe, files verified); --force to redo")
    print(f"{'variant':<16} {'technique':<11} {'params':>10} {'MACs':>12} {'zlib KiB':>9} "
          f"{'p50 ms':>8} {'speedup':>8} {'acc %':>6} {'pareto':>6}")
    for v in result.variants:
        acc = "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}"
        tech = v.technique + ("+int8" if v.quantize else "")
        print(f"{v.name:<16} {tech:<11} {v.params:>10} {v.macs:>12} "
              f"{v.compressed_bytes / 1024:>9.1f} {v.latency_ms_p50:>8.3f} "
              f"{v.speedup:>7.2f}x {acc:>6} {'*' if v.pareto else '':>6}")
    print(f"report: {result.report_path} (and report.md, report.png)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunefleet",
        description="Prepare pruned model variants and run them on a device fleet.",
    )
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole loop once on embedded defaults")
    d.add_argument("--broker", metavar="URL",
                   help="mqtt://host:port of an external broker (default: embedded amqtt)")
    d.add_argument("--agents", type=int, default=3, help="agent processes (default 3)")
    d.add_argument("--work-dir", type=Path, default=Path(".prunefleet/demo"),
                   help="where variants, keys, agent state and the store go")
    d.add_argument("--timeout", type=float, default=90.0,
                   help="seconds the fleet may run before the demo gives up (default 90)")
    d.set_defaults(func=_cmd_demo)

    pr = sub.add_parser("prepare", help="prepare measured variants from a TOML recipe")
    pr.add_argument("recipe", type=Path, metavar="RECIPE.toml")
    pr.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="where the ONNX variants and report.json go")
    pr.add_argument("--force", action="store_true",
                    help="prepare again even if DIR is up to date, and replace another "
                         "recipe's variants")
    pr.set_defaults(func=_cmd_prepare)

    k = sub.add_parser("keys", help="manage the manifest signing key")
    ks = k.add_subparsers(dest="keys_command", required=True)
    ki = ks.add_parser("init", help="create the signing key if it does not exist")
    ki.add_argument("--dir", type=Path, default=Path(".prunefleet/keys"))
    ki.set_defaults(func=_cmd_keys_init)
    kr = ks.add_parser("rotate", help="new signing key; the old one signs too until retired")
    kr.add_argument("--dir", type=Path, default=Path(".prunefleet/keys"))
    kr.set_defaults(func=_cmd_keys_rotate)
    kt = ks.add_parser("retire", help="end a rotation: stop signing with the previous key")
    kt.add_argument("--dir", type=Path, default=Path(".prunefleet/keys"))
    kt.set_defaults(func=_cmd_keys_retire)

    from .admin import add_commands

    add_commands(sub)  # serve, devices, variants, rollout, telemetry
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "agents", 1) < 1:
        print("prunefleet: --agents must be at least 1", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except PrunefleetError as e:
        print(f"prunefleet: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prunefleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
