#!/usr/bin/env bash
# Runs every Meridian test with its own set-up:
#  1. installs what the tests need when it is missing: from Debian packages Chromium for the
#     browser tests, Firefox ESR for the cross-browser test, iproute2 and util-linux for the
#     network namespace, python3-venv, ffmpeg (ffprobe reads the recordings), postgresql
#     (a throwaway cluster for the session database tests), prometheus (a real server scrapes
#     a node; promtool checks and unit-tests the alert rules in infra/), npm (TypeScript, in
#     target/ts, checks the SDK's declarations), nginx (the proxy config in infra/ carries a
#     TLS WebSocket join), coturn (a relay-only call through the shipped TURN config), and
#     the ShellCheck linter for the shell scripts; from PyPI, in target/aiortc-venv,
#     aiortc (an independent WebRTC client for the signaling tests), and in target/moto-venv,
#     moto's S3 server (the object store the storage tests upload to);
#  2. builds the tests (this step may download crates);
#  3. runs the whole suite inside a private network namespace with only loopback up, so no
#     browser or test can reach anything beyond 127.0.0.0/8.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
[ -x /usr/lib/chromium/chromium ] || need+=(chromium)
[ -x /usr/bin/firefox-esr ] || need+=(firefox-esr)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
python3 -c "import ensurepip" >/dev/null 2>&1 || need+=(python3-venv)
command -v ffprobe >/dev/null 2>&1 || need+=(ffmpeg)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ -x /usr/sbin/nginx ] || need+=(nginx)
command -v shellcheck >/dev/null 2>&1 || need+=(shellcheck)
[ -x /usr/bin/turnserver ] || need+=(coturn)
if [ ${#need[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

venv=target/aiortc-venv
if ! "$venv/bin/python" -c "import aiortc, websockets" >/dev/null 2>&1; then
  echo "tests/run.sh: installing aiortc into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "aiortc==1.16.0" "websockets==15.0.1"
fi
export MERIDIAN_AIORTC_PYTHON="$PWD/$venv/bin/python"

moto=target/moto-venv
if [ ! -x "$moto/bin/moto_server" ]; then
  echo "tests/run.sh: installing moto[server] into $moto"
  python3 -m venv "$moto"
  "$moto/bin/pip" install -q "moto[server]==5.1.*"
fi

# TypeScript checks the SDK's declarations (tests/sdk_types.rs).
if [ ! -x target/ts/node_modules/.bin/tsc ]; then
  echo "tests/run.sh: installing TypeScript into target/ts"
  npm install --prefix target/ts --silent --no-audit --no-fund "typescript@5.6.3"
fi

# The production build (no load generator) compiles on its own.
cargo check --locked --no-default-features --bin meridian
cargo build --tests --locked

if [ "$(id -u)" -eq 0 ]; then
  exec unshare --net tests/in-netns.sh
else
  exec unshare --user --map-root-user --net tests/in-netns.sh
fi
