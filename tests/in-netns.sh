#!/usr/bin/env bash
# Runs inside the private network namespace made by tests/run.sh: loopback only.
set -euo pipefail
ip link set lo up
cargo test --offline --locked -- --test-threads=2 2>&1 | tee target/test-output.log
# One closing line that counts every test of every target (the last target alone may be
# the doc tests, which have none).
awk '/^test result:/ { p += $4; f += $6 } END { printf "all targets: %d passed, %d failed\n", p, f }' \
  target/test-output.log
