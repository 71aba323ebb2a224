#!/usr/bin/env bash
# A three-region Meridian mesh on one Linux machine, for trying things by hand: India, Europe
# and the US each in a network namespace of their own, joined by a bridge, with the delay and
# loss of real inter-region links added by Meridian's impairment proxy (`meridian netem`; this
# kernel has no netem) on every pipe. Needs root, iproute2 and a built binary.
#
#   infra/lab/mesh-lab.sh up      # build (release) if needed, start; prints the demo links
#   infra/lab/mesh-lab.sh status  # ctl status through the India node (every node and pipe)
#   infra/lab/mesh-lab.sh down    # stop everything and remove the namespaces
#
# Settings (environment): LAB_DIR (default target/lab), LAB_LOSS (loss on every pipe, default
# 0.005), LAB_JITTER_MS (default 5), MERIDIAN (the binary, default target/release/meridian).
# One-way delays: India-Europe 60 ms, India-US 100 ms, Europe-US 40 ms.
#
# From the host: http://10.77.0.1:7001 (India), http://10.77.0.2:7002 (Europe),
# http://10.77.0.3:7003 (US); admin APIs on port 9465 of each address.
set -euo pipefail
cd "$(dirname "$0")/../.."

LAB_DIR=${LAB_DIR:-target/lab}
LAB_LOSS=${LAB_LOSS:-0.005}
LAB_JITTER_MS=${LAB_JITTER_MS:-5}
MERIDIAN=${MERIDIAN:-target/release/meridian}
BRIDGE=mlab0
REGIONS=(india europe us)
declare -A IP=([india]=10.77.0.1 [europe]=10.77.0.2 [us]=10.77.0.3)
declare -A SIGNALING=([india]=7001 [europe]=7002 [us]=7003)
declare -A METRICS=([india]=9101 [europe]=9102 [us]=9103)
declare -A DELAY=([india:europe]=60 [india:us]=100 [europe:us]=40)
PIPE_PORT=7100

die() { echo "mesh-lab: $*" >&2; exit 1; }

delay_between() {
    local a=$1 b=$2
    echo "${DELAY[$a:$b]:-${DELAY[$b:$a]}}"
}

# The port on which a node's proxy for pipes from region `from` listens.
proxy_port() {
    local from=$1 i
    for i in "${!REGIONS[@]}"; do
        if [[ ${REGIONS[$i]} == "$from" ]]; then
            echo $((7110 + i))
            return
        fi
    done
}

up() {
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces)"
    command -v ip >/dev/null || die "needs iproute2"
    if [[ ! -x $MERIDIAN ]]; then
        cargo build --release --bin meridian
    fi
    mkdir -p "$LAB_DIR/logs"
    local lab
    lab=$(cd "$LAB_DIR" && pwd)

    ip link add "$BRIDGE" type bridge 2>/dev/null || true
    ip addr replace 10.77.0.254/24 dev "$BRIDGE"
    ip link set "$BRIDGE" up

    if [[ ! -f $lab/certs/ca.pem ]]; then
        "$MERIDIAN" ca init --dir "$lab/certs"
    fi
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$lab/admin.token"

    local r
    for r in "${REGIONS[@]}"; do
        local ns=mlab-$r
        ip netns add "$ns" 2>/dev/null || true
        ip link add "v-$r" type veth peer name "v-$r-ns" 2>/dev/null || true
        ip link set "v-$r" master "$BRIDGE" up
        ip link set "v-$r-ns" netns "$ns" 2>/dev/null || true
        ip -n "$ns" addr replace "${IP[$r]}/24" dev "v-$r-ns"
        ip -n "$ns" link set "v-$r-ns" up
        ip -n "$ns" link set lo up
        [[ -f $lab/certs/$r-1.pem ]] || "$MERIDIAN" ca issue --dir "$lab/certs" --node "$r-1" --region "$r"

        # Every pipe crosses an impairment proxy: this node is dialed through proxies in its
        # own namespace (one per other region, forwarding to its pipe port), and dials the
        # other regions through theirs.
        local peers=() other
        for other in "${REGIONS[@]}"; do
            [[ $other == "$r" ]] && continue
            peers+=("\"${IP[$other]}:$(proxy_port "$r")\"")
            ip netns exec "$ns" "$MERIDIAN" netem \
                --listen "${IP[$r]}:$(proxy_port "$other")" --upstream "${IP[$r]}:$PIPE_PORT" \
                --delay-ms "$(delay_between "$r" "$other")" --jitter-ms "$LAB_JITTER_MS" \
                --loss "$LAB_LOSS" >"$lab/logs/netem-$r-$other.log" 2>&1 &
            echo $! >>"$lab/pids"
        done
        local IFS=,
        cat >"$lab/$r-1.toml" <<TOML
# The lab's node file for $r-1, layered over regions/$r.toml.
[node]
id = "$r-1"

[signaling]
listen = "${IP[$r]}:${SIGNALING[$r]}"

[metrics]
listen = "${IP[$r]}:${METRICS[$r]}"

[rtc]
listen_ip = "${IP[$r]}"
announced_ip = "${IP[$r]}"

[mesh]
listen = "${IP[$r]}:$PIPE_PORT"
peers = [${peers[*]}]
ca_file = "$lab/certs/ca.pem"
cert_file = "$lab/certs/$r-1.pem"
key_file = "$lab/certs/$r-1.key"

[admin]
listen = "${IP[$r]}:9465"
token_file = "$lab/admin.token"
TOML
        unset IFS
        "$MERIDIAN" check --config "regions/$r.toml" --config "$lab/$r-1.toml" >/dev/null
        ip netns exec "$ns" "$MERIDIAN" serve --config "regions/$r.toml" --config "$lab/$r-1.toml" \
            >"$lab/logs/$r-1.log" 2>&1 &
        echo $! >>"$lab/pids"
    done
    echo "mesh-lab: up. Logs in $lab/logs; demo pages:"
    for r in "${REGIONS[@]}"; do
        echo "  $r: http://${IP[$r]}:${SIGNALING[$r]}/"
    done
    echo "  status: $0 status"
}

status() {
    local lab
    lab=$(cd "$LAB_DIR" && pwd)
    "$MERIDIAN" ctl --admin "http://${IP[india]}:9465" --token-file "$lab/admin.token" status
}

down() {
    if [[ -f $LAB_DIR/pids ]]; then
        xargs -r kill <"$LAB_DIR/pids" 2>/dev/null || true
        rm -f "$LAB_DIR/pids"
    fi
    local r
    for r in "${REGIONS[@]}"; do
        ip netns del "mlab-$r" 2>/dev/null || true
        ip link del "v-$r" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    echo "mesh-lab: down"
}

case ${1:-} in
    up) up ;;
    status) status ;;
    down) down ;;
    *) echo "usage: $0 up|status|down" >&2; exit 2 ;;
esac
