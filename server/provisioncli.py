"""The CLI's provisioning commands: ``ca init``, ``ca broker-cert``, ``devices provision``
and ``devices revoke`` (see :mod:`.provision`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .adminclient import ApiError, UsageError, check_id
from .provision import (
    CA_CERT,
    ProvisionError,
    init_ca,
    issue_server_cert,
    provision_device,
    revoke_device,
)

DEFAULT_CA = Path(".prunefleet/ca")
DEFAULT_KEYS = Path(".prunefleet/keys")
RELOAD_HINT = ("tell the broker to reload its password file: `systemctl reload mosquitto` "
               "(or `kill -HUP <mosquitto pid>`)")


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _cmd_ca_init(args: argparse.Namespace) -> int:
    cert, created = init_ca(args.ca_dir)
    if args.json:
        _print_json({"certificate": str(cert), "created": created})
        return 0
    print(f"{'new' if created else 'existing'} CA: {cert} (key {args.ca_dir / 'ca.key'}, 0600)")
    print("give the broker a certificate from it: prunefleet ca broker-cert HOST")
    return 0


def _cmd_ca_broker_cert(args: argparse.Namespace) -> int:
    out = args.out or args.ca_dir
    crt, key = issue_server_cert(args.ca_dir, args.names, out)
    if args.json:
        _print_json({"certificate": str(crt), "key": str(key), "ca": str(args.ca_dir / CA_CERT)})
        return 0
    print(f"broker certificate {crt} and key {key} (0600) for {', '.join(args.names)}")
    print("in prunefleet.conf: cafile = ca.crt, certfile = server.crt, keyfile = server.key, "
          "readable by the broker's user")
    return 0


def _trusted_keys(keys_dir: Path) -> list[Path]:
    """The server's public key, and the previous one while a rotation is in progress."""
    from .keys import PREVIOUS_PUBLIC, PUBLIC

    current = keys_dir / PUBLIC
    if not current.is_file():
        raise UsageError(f"no public key in {keys_dir}: run `prunefleet keys init` first")
    previous = keys_dir / PREVIOUS_PUBLIC
    return [current, *([previous] if previous.is_file() else [])]


def _cmd_provision(args: argparse.Namespace) -> int:
    check_id(args.device, "device id")
    if args.group is not None:
        check_id(args.group, "group")
    try:
        bundle = provision_device(
            args.device, passwd_file=args.passwd_file, out_dir=args.out,
            broker_url=args.broker, ca_dir=args.ca_dir, trusted_keys=_trusted_keys(args.keys),
            group=args.group, install_dir=args.install_dir, force=args.force,
            api_socket=args.api_socket or None,
        )
    except ProvisionError as e:
        raise UsageError(str(e)) from e
    if args.json:
        _print_json({"device_id": bundle.device_id, "bundle": str(bundle.directory),
                     "config": str(bundle.config), "broker_url": bundle.broker_url,
                     "passwd_file": str(args.passwd_file)})
        return 0
    print(f"{bundle.device_id}: broker identity in {args.passwd_file}, bundle in "
          f"{bundle.directory} (0700, files 0600)")
    print(f"1. {RELOAD_HINT}")
    print(f"2. on the device: sudo deploy/install-agent.sh {bundle.directory}")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    from .admin import _client

    check_id(args.device, "device id")
    try:
        removed = revoke_device(args.device, args.passwd_file)
    except ProvisionError as e:
        raise UsageError(str(e)) from e
    marked = None
    if not args.broker_only:
        try:
            marked = _client(args).revoke_device(args.device)
        except ApiError as e:
            done = (f"was removed from {args.passwd_file} ({RELOAD_HINT})" if removed
                    else f"has no entry in {args.passwd_file}")
            raise ApiError(f"{args.device} {done}, but the server was not told: {e}",
                           e.status, e.details) from e
    if args.json:
        _print_json({"device_id": args.device, "broker_entry_removed": removed,
                     "revoked_at": None if marked is None else marked["revoked_at"]})
        return 0
    print(f"{args.device}: " + (f"removed from {args.passwd_file}" if removed
                                else f"had no entry in {args.passwd_file}")
          + ("" if marked is None else "; marked revoked at the server"))
    print(f"{RELOAD_HINT}: it then drops the device's connection and refuses it")
    return 0


def add_ca_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("ca", help="the fleet's certificate authority (broker TLS)")
    cs = c.add_subparsers(dest="ca_command", required=True)
    ci = cs.add_parser("init", help="create the CA key and certificate if they do not exist")
    ci.add_argument("--ca-dir", type=Path, default=DEFAULT_CA, metavar="DIR",
                    help="where ca.key (0600) and ca.crt go (default %(default)s)")
    ci.add_argument("--json", action="store_true", help="print JSON")
    ci.set_defaults(func=_cmd_ca_init)
    cb = cs.add_parser("broker-cert", help="a TLS certificate for the broker, from the CA")
    cb.add_argument("names", nargs="+", metavar="HOST",
                    help="DNS names or IP addresses devices use to reach the broker")
    cb.add_argument("--ca-dir", type=Path, default=DEFAULT_CA, metavar="DIR",
                    help="the CA (default %(default)s)")
    cb.add_argument("--out", type=Path, metavar="DIR",
                    help="where server.crt and server.key go (default: the CA directory)")
    cb.add_argument("--json", action="store_true", help="print JSON")
    cb.set_defaults(func=_cmd_ca_broker_cert)


def add_device_commands(ds: argparse._SubParsersAction,
                        client_args=None) -> None:
    """``devices provision`` and ``devices revoke``; ``client_args(parser, nested=True)``
    adds the API options (revoke tells the server)."""
    dp = ds.add_parser("provision", help="create a device's broker identity and agent bundle")
    dp.add_argument("device", help="the device id (its broker user name)")
    dp.add_argument("--broker", required=True, metavar="URL",
                    help="mqtts://host:port devices use to reach the broker")
    dp.add_argument("--passwd-file", type=Path, required=True, metavar="FILE",
                    help="the broker's password file (mosquitto password_file)")
    dp.add_argument("--out", type=Path, required=True, metavar="DIR",
                    help="where the agent bundle goes (created 0700)")
    dp.add_argument("--ca-dir", type=Path, default=DEFAULT_CA, metavar="DIR",
                    help="the CA from `prunefleet ca init` (default %(default)s)")
    dp.add_argument("--keys", type=Path, default=DEFAULT_KEYS, metavar="DIR",
                    help="the signing key directory; agents pin its public keys "
                         "(default %(default)s)")
    dp.add_argument("--group", help="the group the agent asks to join")
    dp.add_argument("--install-dir", type=Path, default=Path("/etc/prunefleet"),
                    metavar="DIR", help="where install-agent.sh puts the bundle on the "
                                        "device; agent.toml names files there (%(default)s)")
    dp.add_argument("--api-socket", default="/run/prunefleet/agent.sock", metavar="PATH",
                    help="the agent's local inference socket (%(default)s; '' for none)")
    dp.add_argument("--force", action="store_true",
                    help="replace a bundle in --out (and the device's password)")
    dp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print JSON")
    dp.set_defaults(func=_cmd_provision)

    dr = ds.add_parser("revoke", help="remove a device's broker access and mark it revoked")
    if client_args is not None:
        client_args(dr, nested=True)
    dr.add_argument("device")
    dr.add_argument("--passwd-file", type=Path, required=True, metavar="FILE",
                    help="the broker's password file")
    dr.add_argument("--broker-only", action="store_true",
                    help="only remove the password entry; do not tell the server")
    dr.set_defaults(func=_cmd_revoke)
