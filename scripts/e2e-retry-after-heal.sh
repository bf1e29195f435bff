#!/usr/bin/env bash
# Re-runs, once each, the end-to-end tests that failed in a run during which the shared test
# RabbitMQ wedged and was restarted (scripts/heal-rabbitmq.sh printed "killing it" in the log), or
# by whose end it had wedged (it does not answer the handshake when this script starts).
#
#   scripts/e2e-retry-after-heal.sh target/test-logs/e2e.log
#
# Why: the Debian RabbitMQ 3.10 node of the CI machines sometimes stops answering the AMQP
# handshake in the middle of a test (seen after a scheduler closed its connection in
# fleet_hardening, late in a full run: the broker logged nothing for 60 s, new connections got no
# handshake). The next test's harness restarts the node, but the test that was running is lost to
# the broker, not to our code. Without a restart in the log, and with the node answering when this
# script starts, nothing is re-run: a failure then stands. A test that hung until the harness's
# watchdog ended its binary is re-run with the tests of that binary the exit skipped. Each re-run
# is printed, with its output in target/test-logs/e2e-retry.log; exit 0 only if every re-run passes.
set -uo pipefail
log=${1:?usage: $0 E2E_LOG}
cd "$(dirname "$0")/.."
if ! grep -q "does not answer the AMQP handshake: killing it" "$log"; then
  # The node can also wedge during the run's last tests, with no later test to restart it (seen
  # 2026-12-07: the last test's scheduler never got its job, and the next run found the node not
  # answering): ask it now.
  healed=$(bash scripts/heal-rabbitmq.sh 2>&1)
  printf '%s\n' "$healed" | tee -a "$log" >&2
  if grep -q "does not answer the AMQP handshake: killing it" <<<"$healed"; then
    echo "e2e-retry: the broker had wedged by the end of the run and was restarted" >&2
  else
    echo "e2e-retry: the broker was not restarted during the run and answers now; failures stand" >&2
    exit 1
  fi
fi
# (binary, test) of every failure: the "---- NAME stdout ----" blocks, under the binary whose
# "Running tests/BIN.rs" line came last.
mapfile -t failed < <(awk '
  /^== failures/ { exit }
  $1 == "Running" { bin = "" }
  $1 == "Running" && $2 ~ /^tests\/.*\.rs$/ { bin = $2; sub(/^tests\//, "", bin); sub(/\.rs$/, "", bin) }
  /^---- .* stdout ----$/ && bin != "" { print bin " " $2 }
' "$log" | sort -u)
# A test that hung past the harness's limit (tests/src/lib.rs, TEST_LIMIT) ends its whole binary
# with "e2e-watchdog: NAME (namespace …) still ran …": that test and every test of the binary that
# had not passed (or been ignored) by then are re-run.
mapfile -t hung < <(awk '
  /^== failures/ { exit }
  $1 == "Running" { bin = "" }
  $1 == "Running" && $2 ~ /^tests\/.*\.rs$/ { bin = $2; sub(/^tests\//, "", bin); sub(/\.rs$/, "", bin) }
  /e2e-watchdog: / && bin != "" { print bin }
' "$log" | sort -u)
for bin in "${hung[@]}"; do
  # Tests that passed in that binary's part of the log.
  passed=$(awk -v want="tests/$bin.rs" '
    $1 == "Running" { on = ($2 == want) }
    on && /^test .* \.\.\. ok$/ { print $2 }
  ' "$log")
  ignored=$(${CARGO:-cargo} test -q -p ditfleet-tests --test "$bin" -- --list --ignored 2>/dev/null | sed -n 's/: test$//p')
  while read -r name; do
    [ -n "$name" ] || continue
    grep -qxF "$name" <<<"$passed" && continue
    grep -qxF "$name" <<<"$ignored" && continue
    failed+=("$bin $name")
  done < <(${CARGO:-cargo} test -q -p ditfleet-tests --test "$bin" -- --list 2>/dev/null | sed -n 's/: test$//p')
done
mapfile -t failed < <(printf '%s\n' "${failed[@]}" | sed '/^$/d' | sort -u)
out=target/test-logs/e2e-retry.log
mkdir -p "$(dirname "$out")"
: > "$out"
rc=0
for entry in "${failed[@]}"; do
  bin=${entry%% *} name=${entry#* }
  echo "e2e-retry: the broker wedged during the run; re-running $bin::$name once" >&2
  bash scripts/heal-rabbitmq.sh
  one=$(mktemp)
  DITFLEET_TEST_HEAL_BROKER=1 ${CARGO:-cargo} test -p ditfleet-tests --test "$bin" -- --exact "$name" --test-threads=1 \
    > "$one" 2>&1
  code=$?
  cat "$one" >> "$out"
  # Passed only if exactly that one test ran and passed.
  if [ $code -eq 0 ] && grep -q "^test result: ok. 1 passed" "$one"; then
    echo "e2e-retry: $bin::$name passed on the re-run" >&2
  else
    echo "e2e-retry: $bin::$name FAILED again (target/test-logs/e2e-retry.log)" >&2
    rc=1
  fi
  rm -f "$one"
done
exit $rc
