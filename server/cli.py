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

    k = sub.add_parser("keys", help="manage the manifest signing key")
    ks = k.add_subparsers(dest="keys_command", required=True)
    ki = ks.add_parser("init", help="create the signing key if it does not exist")
    ki.add_argument("--dir", type=Path, default=Path(".prunefleet/keys"))
    ki.set_defaults(func=_cmd_keys_init)
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
