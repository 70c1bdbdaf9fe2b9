#!/bin/sh
# Install the prunefleet agent on a device as a systemd service.
#
#   sudo deploy/install-agent.sh [PACKAGE] [CONFIG]
#
# PACKAGE  what pip installs (default: "prunefleet[agent]"; a wheel path works too,
#          e.g. ./prunefleet-0.1.0-py3-none-any.whl, given as "WHEEL[agent]")
# CONFIG   the agent's TOML (default: deploy/agent.example.toml, to be edited after)
#
# Creates the system user `prunefleet`, a virtual environment in /opt/prunefleet/venv
# (no torch: the agent extra is onnxruntime, numpy, paho-mqtt, psutil, pydantic,
# cryptography), /etc/prunefleet/agent.toml (kept if present) and the systemd unit.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
package=${1:-"prunefleet[agent]"}
config=${2:-"$here/agent.example.toml"}
python=${PYTHON:-python3}

if [ "$(id -u)" -ne 0 ]; then
    echo "install-agent.sh: run as root" >&2
    exit 1
fi
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install-agent.sh: $python is older than Python 3.11" >&2
    exit 1
}

if ! id prunefleet >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/prunefleet-agent --shell /usr/sbin/nologin prunefleet
fi

install -d -m 0755 /opt/prunefleet
"$python" -m venv /opt/prunefleet/venv
/opt/prunefleet/venv/bin/pip install --quiet --upgrade pip
/opt/prunefleet/venv/bin/pip install --quiet "$package"

install -d -m 0750 -g prunefleet /etc/prunefleet
if [ ! -e /etc/prunefleet/agent.toml ]; then
    install -m 0640 -g prunefleet "$config" /etc/prunefleet/agent.toml
    echo "wrote /etc/prunefleet/agent.toml: set device_id, broker_url and trusted_keys"
fi
install -m 0644 "$here/systemd/prunefleet-agent.service" \
    /etc/systemd/system/prunefleet-agent.service
systemctl daemon-reload
systemctl enable prunefleet-agent.service
echo "enabled prunefleet-agent; start it with: systemctl start prunefleet-agent"
