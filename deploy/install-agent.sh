#!/bin/sh
# Install the prunefleet agent on a device as a systemd service, from the bundle that
# `prunefleet devices provision DEVICE --out BUNDLE` wrote on the operator's machine.
#
#   sudo deploy/install-agent.sh BUNDLE [PACKAGE]
#   sudo deploy/install-agent.sh --config-only BUNDLE     (a device provisioned again)
#
# BUNDLE   the bundle directory: agent.toml, ca.crt, trusted-keys/, broker-password
# PACKAGE  what pip installs (default: "prunefleet[agent]"; a wheel path works too,
#          e.g. ./prunefleet-0.1.0-py3-none-any.whl, given as "WHEEL[agent]")
#
# Creates the system user `prunefleet`, a virtual environment in /opt/prunefleet/venv
# (no torch: the agent extra is onnxruntime, numpy, paho-mqtt, psutil, pydantic,
# cryptography), /etc/prunefleet from the bundle and the systemd unit.
#
# Who reads what: applications that use the agent's socket join the group `prunefleet`.
# That group reads agent.toml, the CA certificate and the trusted keys (nothing secret);
# the broker password is in /etc/prunefleet/broker-password, 0600, owned by the agent's
# user alone, so an application on the device can never become the device.
#
# PRUNEFLEET_ETC (default /etc/prunefleet) and PRUNEFLEET_USER (default prunefleet) move
# the files and their owner, for images built under another root and for the tests.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
config_only=0
if [ "${1:-}" = "--config-only" ]; then
    config_only=1
    shift
fi
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: install-agent.sh [--config-only] BUNDLE [PACKAGE]" >&2
    echo "  BUNDLE: a directory from \`prunefleet devices provision DEVICE --out BUNDLE\`" >&2
    exit 2
fi
bundle=$1
package=${2:-"prunefleet[agent]"}
python=${PYTHON:-python3}
etc=${PRUNEFLEET_ETC:-/etc/prunefleet}
user=${PRUNEFLEET_USER:-prunefleet}

if [ "$(id -u)" -ne 0 ]; then
    echo "install-agent.sh: run as root" >&2
    exit 1
fi
for f in agent.toml ca.crt broker-password; do
    if [ ! -f "$bundle/$f" ]; then
        echo "install-agent.sh: $bundle/$f missing: not a provisioning bundle" >&2
        exit 2
    fi
done
# A password in broker_url would be readable by every application in the socket group.
if grep -Eq '^[[:space:]]*broker_url[[:space:]]*=.*://[^/@"]*:[^/@"]*@' "$bundle/agent.toml"; then
    echo "install-agent.sh: $bundle/agent.toml has a password in broker_url; keep it in" \
         "broker-password only (broker_password_file)" >&2
    exit 2
fi

if ! id "$user" >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/prunefleet-agent --shell /usr/sbin/nologin "$user"
fi
group=$(id -gn "$user")

if [ "$config_only" -eq 0 ]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
        echo "install-agent.sh: $python is older than Python 3.11" >&2
        exit 1
    }
    install -d -m 0755 /opt/prunefleet
    "$python" -m venv /opt/prunefleet/venv
    /opt/prunefleet/venv/bin/pip install --quiet --upgrade pip
    /opt/prunefleet/venv/bin/pip install --quiet "$package"
fi

install -d -m 0750 -o root -g "$group" "$etc"
install -m 0640 -o root -g "$group" "$bundle/agent.toml" "$etc/agent.toml"
install -m 0644 -o root -g root "$bundle/ca.crt" "$etc/ca.crt"
install -d -m 0755 -o root -g root "$etc/trusted-keys"
rm -f "$etc"/trusted-keys/*.pem
for key in "$bundle"/trusted-keys/*.pem; do
    [ -e "$key" ] || continue
    install -m 0644 -o root -g root "$key" "$etc/trusted-keys/"
done
# The secret: the agent's user only (not its group, which applications join).
install -m 0600 -o "$user" -g root "$bundle/broker-password" "$etc/broker-password"
echo "installed the bundle for $(sed -n 's/^device_id = "\(.*\)"$/\1/p' "$etc/agent.toml") in $etc"

if [ "$config_only" -eq 0 ]; then
    install -m 0644 "$here/systemd/prunefleet-agent.service" \
        /etc/systemd/system/prunefleet-agent.service
    systemctl daemon-reload
    systemctl enable prunefleet-agent.service
    echo "enabled prunefleet-agent; start it with: systemctl start prunefleet-agent"
else
    echo "restart the agent to use it: systemctl restart prunefleet-agent"
fi
