"""``prunefleet``: the server and admin command line.

Conventions every command follows: exit code 0 on success, 1 for a failure (the server
refused, a service cannot be reached, the work failed), 2 for a usage error (argparse, or a
value that can never work: a bad id, URL, setting or recipe); every expected failure is one
line on stderr, never a traceback; a closed stdout (``prunefleet … | head``) ends the
command quietly; every command that prints data takes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from prunefleet.shared import __version__
from prunefleet.shared.errors import PrunefleetError

from .adminclient import ApiError, UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_KEYS = Path(".prunefleet/keys")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        args.work_dir, broker_url=args.broker, agents=args.agents, timeout_s=args.timeout
    )


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from .keys import load_or_create

    existed = (args.keys / "signing.pem").exists()
    key = load_or_create(args.keys)
    public = args.keys / "public.pem"
    if args.json:
        _print_json({"keyid": key.keyid, "created": not existed, "public_key": str(public)})
        return 0
    print(f"{'existing' if existed else 'new'} signing key {key.keyid}")
    print(f"public key for agents: {public}")
    return 0


def _cmd_keys_rotate(args: argparse.Namespace) -> int:
    from .keys import PREVIOUS_PUBLIC, PUBLIC, rotate

    ring = rotate(args.keys)
    assert ring.previous is not None  # rotate() always keeps the old key as previous
    public, previous = args.keys / PUBLIC, args.keys / PREVIOUS_PUBLIC
    if args.json:
        _print_json({"current": ring.current.keyid, "previous": ring.previous.keyid,
                     "public_key": str(public), "previous_public_key": str(previous)})
        return 0
    print(f"new signing key {ring.current.keyid}; previous {ring.previous.keyid} kept "
          f"(its public key is now {previous})")
    print(f"1. give agents the new public key too: trusted_keys = [old, \"{public}\"]")
    print("2. a running `prunefleet serve` picks the change up and signs with both keys")
    print("3. once every agent pins the new key: prunefleet keys retire")
    return 0


def _cmd_keys_retire(args: argparse.Namespace) -> int:
    from .keys import retire_previous

    old = retire_previous(args.keys)
    if old is None:
        print("prunefleet: no previous key: no rotation in progress", file=sys.stderr)
        return 1
    if args.json:
        _print_json({"retired": old.keyid})
        return 0
    print(f"retired previous key {old.keyid}; manifests carry the current key only")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import RecipeError, check_recipe, load_recipe, prepare

    try:
        recipe = load_recipe(args.recipe)
        resolved = check_recipe(recipe)  # fails fast: factory, checkpoint, shape, data, export
    except RecipeError as e:
        raise UsageError(str(e)) from e
    result = prepare(recipe, args.out, force=args.force, progress=sys.stderr.isatty(),
                     resolved=resolved)
    if args.json:
        _print_json({"out_dir": str(result.out_dir), "report": str(result.report_path),
                     "cached": result.cached,
                     "variants": [v.to_report() for v in result.variants]})
        return 0
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


class _DeprecatedAlias(argparse.Action):
    """An old option name that still works, hidden from --help, with a one-line warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"prunefleet: {option_string} is deprecated; use --{self.dest.replace('_', '-')}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _keys_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", type=Path, default=DEFAULT_KEYS, metavar="DIR",
                   help="signing key directory, as `serve --keys` (default %(default)s)")
    p.add_argument("--dir", dest="keys", type=Path, action=_DeprecatedAlias,
                   help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunefleet",
        description="Prepare pruned model variants and run them on a device fleet.",
        epilog="Exit codes: 0 success, 1 failure, 2 usage error.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                   help="(default %(default)s)")
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
    pr.add_argument("--json", action="store_true",
                    help="print the variants and their figures as JSON")
    pr.set_defaults(func=_cmd_prepare)

    k = sub.add_parser("keys", help="manage the manifest signing key")
    ks = k.add_subparsers(dest="keys_command", required=True)
    ki = ks.add_parser("init", help="create the signing key if it does not exist")
    _keys_option(ki)
    ki.set_defaults(func=_cmd_keys_init)
    kr = ks.add_parser("rotate", help="new signing key; the old one signs too until retired")
    _keys_option(kr)
    kr.set_defaults(func=_cmd_keys_rotate)
    kt = ks.add_parser("retire", help="end a rotation: stop signing with the previous key")
    _keys_option(kt)
    kt.set_defaults(func=_cmd_keys_retire)

    from .admin import add_commands

    add_commands(sub)  # serve, devices, variants, rollout, telemetry
    return p


def _exit_code(e: PrunefleetError) -> int:
    """2 when the values given can never work (the user's to fix), 1 for a failure."""
    if isinstance(e, UsageError):
        return 2
    if isinstance(e, ApiError) and e.status in (400, 422):  # the server refused the values
        return 2
    return 1


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): end quietly, as a killed pipe would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush goes nowhere
    except (OSError, ValueError):
        pass
    return 128 + 13  # SIGPIPE, what `sh` reports for a command a closed pipe ended


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:  # --help, --version or a usage error: flush where it is caught
            sys.stdout.flush()
            raise
        logging.basicConfig(level=args.log_level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if getattr(args, "agents", 1) < 1:
            print("prunefleet: --agents must be at least 1", file=sys.stderr)
            return 2
        try:
            code = int(args.func(args))
        except PrunefleetError as e:
            print(f"prunefleet: {e}", file=sys.stderr)
            code = _exit_code(e)
        except KeyboardInterrupt:
            print("prunefleet: interrupted", file=sys.stderr)
            code = 130
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()


if __name__ == "__main__":
    sys.exit(main())
