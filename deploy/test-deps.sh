#!/bin/sh
# Installs the Debian packages the test suite runs against, when they are missing:
#   mosquitto                 the broker the tests start (tests/conftest.py)
#   systemd                   systemd-analyze, which checks the agent's unit
#   chromium chromium-driver  headless Chromium, which loads the dashboard
#   prometheus                promtool, which checks deploy/prometheus/prometheus.yml
# As root it installs them with apt-get; as another user it prints the one command to run
# and fails. `make test` runs it first (`make deps`); `.ci/run` runs only `make test`.
set -eu

# mosquitto and promtool may live in an sbin directory that is not on a user's PATH.
have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]
}

missing=""
have mosquitto || missing="$missing mosquitto"
have systemd-analyze || missing="$missing systemd"
have chromium || have chromium-browser || have google-chrome || missing="$missing chromium"
have chromedriver || missing="$missing chromium-driver"
have promtool || missing="$missing prometheus"
[ -n "$missing" ] || exit 0
missing=${missing# }

if [ "$(id -u)" -ne 0 ]; then
    echo "make test: missing test dependencies; run \`sudo apt-get install -y --no-install-recommends $missing\` (Debian/Ubuntu package names) and try again" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "make test: missing test dependencies and no apt-get: install the equivalents of the Debian packages $missing" >&2
    exit 1
fi

echo "make test: installing the test dependencies $missing (apt-get)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# shellcheck disable=SC2086  # $missing is one word per package
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "make test: apt-get could not install $missing (its output is above)" >&2
    exit 1
fi
