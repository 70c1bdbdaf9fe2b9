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
import os
import sys
from pathlib import Path

from prunefleet.shared import __version__
from prunefleet.shared.errors import PrunefleetError
from prunefleet.shared.logsetup import add_logging_options, configure_logging

from .adminclient import ApiError, UsageError

# Long-running commands say what they do at INFO; the others speak only when it matters.
INFO_COMMANDS = ("serve", "prepare")
DEFAULT_KEYS = Path(".prunefleet/keys")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not args.json:
        return run_demo(
            args.work_dir, broker_url=args.broker, agents=args.agents, timeout_s=args.timeout
        )
    # Progress goes to stderr; stdout carries the summary alone.
    summary: dict = {}
    rc = run_demo(args.work_dir, broker_url=args.broker, agents=args.agents,
                  timeout_s=args.timeout, out=lambda *a: print(*a, file=sys.stderr),
                  summary=summary)
    _print_json(summary)
    return rc


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
    print(f"1. give agents the new public key too: trusted_keys = [old, \"{public}\"], "
          "then `systemctl reload prunefleet-agent`")
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
    print(f"retired and revoked previous key {old.keyid}: manifests carry the current key "
          "only and revoke it; an agent that takes one never trusts the old key again")
    return 0


def _cmd_prepare_list(args: argparse.Namespace) -> int:
    """The shipped recipes, one line each (``--json``: with the file each is in)."""
    from .recipes import shipped

    recipes = shipped()
    if args.json:
        _print_json([{"name": r.name, "description": r.description, "file": str(r.file)}
                     for r in recipes])
        return 0
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        print(f"{r.name:<{width}}  {r.description}")
    return 0


def _load_recipe(ref: str):
    """A recipe from a file, or a shipped one by name (``digits``)."""
    from importlib.resources import as_file

    from .prepare import RecipeError, load_recipe
    from .recipes import shipped, shipped_recipe

    by_name = not Path(ref).exists() and "/" not in ref and not ref.endswith(".toml")
    try:
        if not by_name:
            return load_recipe(Path(ref))
        found = shipped_recipe(ref)
        if found is None:
            names = ", ".join(r.name for r in shipped()) or "none"
            raise UsageError(f"no recipe file {ref!r} and no shipped recipe of that name "
                             f"(shipped: {names}; see prunefleet prepare --list)")
        with as_file(found.file) as file:
            return load_recipe(file)
    except RecipeError as e:
        raise UsageError(str(e)) from e


def _class_model(args: argparse.Namespace):
    """``--for-class``: the class's latency model from the fleet's profiles (``--class-profiles
    FILE``, or the server's ``/v1/classes`` and ``/v1/variants``); None to measure here."""
    from .adminclient import AdminClient, check_server_url, find_token
    from .prepare.target import class_model_from_api

    if args.class_profiles is not None:
        try:
            data = json.loads(Path(args.class_profiles).read_text(encoding="utf-8"))
            classes, variants = data["classes"], data["variants"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--class-profiles {args.class_profiles}: not a JSON object with "
                             f"'classes' and 'variants': {e}") from e
    elif args.server or os.environ.get("PRUNEFLEET_SERVER"):
        token, source = find_token(args.token, args.token_file)
        client = AdminClient(check_server_url(args.server or os.environ["PRUNEFLEET_SERVER"]),
                             token, token_source=source)
        classes, variants = client.classes(), client.variants()
    else:
        return None
    model = class_model_from_api(args.for_class, classes, variants)
    if model is None:
        print(f"prunefleet: class {args.for_class!r} has no fleet profiles to fit (two "
              "profiled variants of one family at least): latency is measured on this host",
              file=sys.stderr)
    return model


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import RecipeError, check_recipe, prepare
    from .registry import technique_label

    if args.list:
        return _cmd_prepare_list(args)
    if args.recipe is None or args.out is None:
        raise UsageError("prepare needs a RECIPE (a .toml file, or a shipped recipe's name: "
                         "prunefleet prepare --list) and --out DIR")
    recipe = _load_recipe(args.recipe)
    if args.for_class is not None and not (
            0 < len(args.for_class) <= 64
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in args.for_class)):
        raise UsageError(f"--for-class {args.for_class!r}: a device class name "
                         "(letters, digits, '_', '.', '-'; 64 at most)")
    class_model = _class_model(args) if args.for_class else None
    try:
        resolved = check_recipe(recipe)  # fails fast: factory, checkpoint, shape, data, export
    except RecipeError as e:
        raise UsageError(str(e)) from e
    result = prepare(recipe, args.out, force=args.force, progress=sys.stderr.isatty(),
                     resolved=resolved, for_class=args.for_class, class_model=class_model)
    if args.json:
        _print_json({"out_dir": str(result.out_dir), "report": str(result.report_path),
                     "cached": result.cached,
                     "variants": [v.to_report() for v in result.variants]})
        return 0
    if result.cached:
        print(f"{args.out}: up to date (same recipe, files verified); --force to redo")
    techs = [technique_label(v.technique, v.quantize) for v in result.variants]
    nw = max([len("variant"), *(len(v.name) for v in result.variants)])
    tw = max([len("technique"), *(len(t) for t in techs)])
    print(f"{'variant':<{nw}} {'technique':<{tw}} {'params':>10} {'MACs':>12} "
          f"{'zlib KiB':>9} {'p50 ms':>8} {'speedup':>8} {'acc %':>6} {'pareto':>6}")
    for v, tech in zip(result.variants, techs, strict=True):
        acc = "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}"
        print(f"{v.name:<{nw}} {tech:<{tw}} {v.params:>10} {v.macs:>12} "
              f"{v.compressed_bytes / 1024:>9.1f} {v.latency_ms_p50:>8.3f} "
              f"{v.speedup:>7.2f}x {acc:>6} {'*' if v.pareto else '':>6}")
    target = result.report.get("target") or {}
    for d in target.get("dropped") or []:
        print(f"dropped {d['name']}: {d['reason']}")
    missed = [v.name for v in result.variants if v.target and not v.target["meets"]]
    if missed:
        print(f"missing the target ({target.get('latency_source')}): {', '.join(missed)} "
              "(report.md says which budget)")
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
    add_logging_options(p, default_level=None, level_help="default INFO for "
                        f"{' and '.join(INFO_COMMANDS)}, WARNING for the rest")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the whole loop once on embedded defaults")
    d.add_argument("--broker", metavar="URL",
                   help="mqtt://host:port of an external broker (default: embedded amqtt)")
    d.add_argument("--agents", type=int, default=3, help="agent processes (default 3)")
    d.add_argument("--work-dir", type=Path, default=Path(".prunefleet/demo"),
                   help="where variants, keys, agent state and the store go")
    d.add_argument("--timeout", type=float, default=90.0,
                   help="seconds the fleet may run before the demo gives up (default 90)")
    d.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout (progress goes to stderr)")
    d.set_defaults(func=_cmd_demo)

    pr = sub.add_parser("prepare", help="prepare measured variants from a TOML recipe",
                        description="Prepare measured variants from a recipe: a TOML file, "
                        "or the name of a recipe shipped in the package (--list shows them).")
    pr.add_argument("recipe", nargs="?", metavar="RECIPE",
                    help="a .toml file, or a shipped recipe's name (e.g. digits)")
    pr.add_argument("--list", action="store_true",
                    help="list the shipped recipes, one line each, and exit")
    pr.add_argument("--out", type=Path, metavar="DIR",
                    help="where the ONNX variants and report.json go (required)")
    pr.add_argument("--force", action="store_true",
                    help="prepare again even if DIR is up to date, and replace another "
                         "recipe's variants")
    pr.add_argument("--json", action="store_true",
                    help="print the variants and their figures as JSON")
    pr.add_argument("--for-class", metavar="CLASS",
                    help="prepare for a device class: its instruction set picks the channel "
                         "rounding, and its latency (fitted on the fleet's profiles, else "
                         "measured here) the pruning ratio and INT8 (docs/hardware.md)")
    pr.add_argument("--class-profiles", type=Path, metavar="FILE",
                    help="with --for-class: the fleet's profiles as JSON, "
                         '{"classes": GET /v1/classes, "variants": GET /v1/variants}, '
                         "instead of asking --server")
    pr.add_argument("--server", default=None,
                    help="with --for-class: API base URL to read the class's profiles from "
                         "(default $PRUNEFLEET_SERVER; neither: measure on this host)")
    pr.add_argument("--token", default=None, help="API bearer token (default "
                    "$PRUNEFLEET_TOKEN)")
    pr.add_argument("--token-file", type=Path, default=None,
                    help="file holding the token (default .prunefleet/server/api-token)")
    pr.set_defaults(func=_cmd_prepare)

    k = sub.add_parser("keys", help="manage the manifest signing key")
    ks = k.add_subparsers(dest="keys_command", required=True)
    ki = ks.add_parser("init", help="create the signing key if it does not exist")
    _keys_option(ki)
    ki.set_defaults(func=_cmd_keys_init)
    kr = ks.add_parser("rotate", help="new signing key; the old one signs too until retired")
    _keys_option(kr)
    kr.set_defaults(func=_cmd_keys_rotate)
    kt = ks.add_parser("retire", help="end a rotation: stop signing with the previous key "
                       "and revoke it on every agent")
    _keys_option(kt)
    kt.set_defaults(func=_cmd_keys_retire)

    from .admin import add_commands

    add_commands(sub)  # serve, devices, pin, unpin, variants, rollout, telemetry

    from .provisioncli import add_ca_commands

    add_ca_commands(sub)  # ca init, ca broker-cert

    from .migrate import add_commands as add_store_commands

    add_store_commands(sub)  # store migrate
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
        configure_logging(
            args.log_level or ("INFO" if args.command in INFO_COMMANDS else "WARNING"),
            args.log_format)
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
