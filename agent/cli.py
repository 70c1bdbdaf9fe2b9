"""``prunefleet-agent``: run the device agent (normally under systemd)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from prunefleet.shared.errors import PrunefleetError
from prunefleet.shared.logsetup import add_logging_options, configure_logging

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prunefleet-agent", description=__doc__)
    p.add_argument("--config", type=Path, help="agent TOML file")
    p.add_argument("--device-id")
    p.add_argument("--broker-url")
    p.add_argument("--state-dir", type=Path)
    p.add_argument("--config-reference", action="store_true",
                   help="print every configuration key (Markdown: docs/agent-config.md) "
                        "and exit")
    add_logging_options(p)
    args = p.parse_args(argv)
    if args.config_reference:
        from .configref import render

        sys.stdout.write(render())
        return 0
    configure_logging(args.log_level, args.log_format)
    # The service imports onnxruntime; keep `--help` fast.
    from .service import Agent
    from .simapp import SimulatedApp

    try:
        cfg = load_config(
            args.config, device_id=args.device_id, broker_url=args.broker_url,
            state_dir=args.state_dir,
        )
        agent = Agent(cfg)
    except PrunefleetError as e:
        print(f"prunefleet-agent: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # SIGHUP re-reads the policy settings from the same file and environment.
    agent.reload_source = lambda: load_config(
        args.config, device_id=args.device_id, broker_url=args.broker_url,
        state_dir=args.state_dir,
    )
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    app = None
    if cfg.workload is not None:
        app = SimulatedApp(agent, cfg.workload)
        app.start()
    agent.run(until=stop, on_stop=app.stop if app is not None else None)
    if app is not None:
        logging.getLogger("prunefleet.agent").info(
            "simulated app served %d requests (%d errors)", app.served, app.errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
