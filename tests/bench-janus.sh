#!/usr/bin/env bash
# Runs a benchmark against Meridian and Janus in one invocation (`--sfu both` unless another
# --sfu is given). The first argument may name the benchmark, `fanout` (the default) or
# `sessions`; the others go to `meridian bench <name>`, e.g.
#   tests/bench-janus.sh --subscribers 1,10,50 --json docs/figures/fanout.json
#   tests/bench-janus.sh sessions --sessions 10,25,50 --workers 1,2
# Janus 1.1 never offers a loopback candidate, so everything runs inside a private network
# namespace holding loopback plus a veth with 127.0.0.2/32, the only interface Janus may gather
# on. Nothing can leave the namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v janus >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq janus >/dev/null
fi
cargo build --release --locked
bench=fanout
case "${1:-}" in fanout|sessions) bench=$1; shift ;; esac
case " $* " in *" --sfu "*) ;; *) set -- --sfu both "$@" ;; esac
exec unshare --net bash -c '
  set -e
  ip link set lo up
  ip link add mjanus0 type veth peer name mjanus1
  ip addr add 127.0.0.2/32 dev mjanus0
  ip link set mjanus0 up
  ip link set mjanus1 up
  bench=$1; shift
  exec ./target/release/meridian bench "$bench" --janus-interface mjanus0 "$@"
' bash "$bench" "$@"
