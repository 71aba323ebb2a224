#!/usr/bin/env bash
# Runs inside the private network namespace made by tests/run.sh: loopback only.
set -euo pipefail
ip link set lo up
# Every test binary runs even when an earlier one fails, so one run reports every failure.
set +e
cargo test --offline --locked --no-fail-fast -- --test-threads=2 2>&1 | tee target/test-output.log
status=${PIPESTATUS[0]}
set -e
failed=$(grep -E '^test .* \.\.\. FAILED$' target/test-output.log | sed -e 's/^test //' -e 's/ \.\.\. FAILED$//' || true)
if [ -n "$failed" ]; then
  echo
  echo "failed tests:"
  echo "$failed" | sed 's/^/  /'
fi
# One closing line that counts every test of every target (the last target alone may be
# the doc tests, which have none).
awk '/^test result:/ { p += $4; f += $6 } END { printf "all targets: %d passed, %d failed\n", p, f }' \
  target/test-output.log
exit "$status"
