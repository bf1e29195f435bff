#!/usr/bin/env bash
# Restarts the shared test RabbitMQ on 127.0.0.1:5672 when it no longer answers the AMQP handshake.
# Used by the end-to-end harness (tests/src/lib.rs, only when DITFLEET_TEST_HEAL_BROKER=1, which
# `make test` sets). Seen on the Debian RabbitMQ 3.10 node of the CI machines: after a burst of
# test topologies (hundreds of quorum queues declared and deleted) under a load of 10+ on 2 cores,
# the node stayed up (`rabbitmq-diagnostics ping` succeeded) but accepted TCP connections without
# ever reading them, and `rabbitmqctl stop_app` hung. One trigger caught in its log (2026-12-06): a
# client killed just after its channel declared a namespace's quorum queues; the node killed that
# channel 70 s later (`shutdown_error`, `reason: killed`) and was silent from then on. Another wedge
# that day followed a drained worker's clean close, with nothing in the log. Nothing of the node's
# state is worth keeping between tests (each test builds its own namespace), so the node is killed,
# its database wiped and started again. Prints what it did; exit 0 once the handshake is answered.
#   scripts/heal-rabbitmq.sh            heal if wedged (no-op when healthy)
set -uo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { printf 'heal-rabbitmq: %s\n' "$*" >&2; }
handshake() { # the broker answers "AMQP 0-9-1" with a Connection.Start frame
  timeout 10 python3 - <<'PY' 2>/dev/null
import socket, sys
s = socket.create_connection(("127.0.0.1", 5672), timeout=8)
s.sendall(b"AMQP\x00\x00\x09\x01")
sys.exit(0 if s.recv(8) else 1)
PY
}
handshake && { log "RabbitMQ answers on 5672: nothing to do"; exit 0; }
pid=$(ss -ltnpH 'sport = :5672' 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
if [ -n "$pid" ]; then
  log "RabbitMQ (pid $pid) does not answer the AMQP handshake: killing it"
  $SUDO kill -9 "$pid" 2>/dev/null || true
  sleep 2
fi
log "wiping its database and starting it again"
$SUDO rm -rf /var/lib/rabbitmq/mnesia/rabbit@*
$SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 120); do
  handshake && { $SUDO rabbitmqctl -q await_startup >/dev/null 2>&1; log "RabbitMQ answers again"; exit 0; }
  sleep 1
done
log "RabbitMQ did not come back within 120 s"
exit 1
