#!/bin/sh
# Installs the Debian packages the test suite runs against, when they are missing:
#   mosquitto                 the broker the tests start (tests/conftest.py)
#   systemd                   systemd-analyze, which checks the agent's unit
#   chromium chromium-driver  headless Chromium, which loads the dashboard
#   prometheus                promtool, which checks deploy/prometheus/prometheus.yml
#   nats-server               the NATS MQTT gateway the ingest probe must refuse (tests/test_replicas.py)
# With the argument `system`, the packages of the system suite (`make test-system`) instead:
#   debootstrap               builds the Debian arm64 root (tests/test_platforms.py)
#   qemu-user-static          runs arm64 binaries in that root
#   binfmt-support            update-binfmts, which registers qemu with the kernel
#   iproute2                  ip netns, tc: agents behind lossy links (tests/test_lossy_network.py)
# As root it installs them with apt-get; as another user it prints the one command to run
# and fails. `make test` runs it first (`make deps`), `make test-system` with `system`
# (`make system-deps`); `.ci/run` runs those two targets.
set -eu
target="make test"
[ "${1:-}" = system ] && target="make test-system"

# mosquitto and promtool may live in an sbin directory that is not on a user's PATH.
have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]
}

missing=""
if [ "${1:-}" = system ]; then
    have debootstrap || missing="$missing debootstrap"
    have qemu-aarch64-static || missing="$missing qemu-user-static"
    have update-binfmts || missing="$missing binfmt-support"
    have ip && have tc || missing="$missing iproute2"
    # debootstrap checks the Debian archive's signatures (not installed on Ubuntu by default)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing="$missing debian-archive-keyring"
else
    have mosquitto || missing="$missing mosquitto"
    have systemd-analyze || missing="$missing systemd"
    have chromium || have chromium-browser || have google-chrome || missing="$missing chromium"
    have chromedriver || missing="$missing chromium-driver"
    have promtool || missing="$missing prometheus"
    have nats-server || missing="$missing nats-server"
fi
[ -n "$missing" ] || exit 0
missing=${missing# }

if [ "$(id -u)" -ne 0 ]; then
    echo "$target: missing test dependencies; run \`sudo apt-get install -y --no-install-recommends $missing\` (Debian/Ubuntu package names) and try again" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "$target: missing test dependencies and no apt-get: install the equivalents of the Debian packages $missing" >&2
    exit 1
fi

echo "$target: installing the test dependencies $missing (apt-get)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# shellcheck disable=SC2086  # $missing is one word per package
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "$target: apt-get could not install $missing (its output is above)" >&2
    exit 1
fi
