#!/usr/bin/env bash
# Tests of the Python producer client (clients/python) against a real fleet.
#
# Makes a virtualenv in clients/python/.venv (git-ignored) and installs the
# package with its test extras from PyPI; type-checks it with `mypy --strict`;
# builds Holdfast; starts `holdfast run` (every role) on a database, AMQP
# namespace and (where rabbitmqctl works) RabbitMQ virtual host of its own,
# with the HTTP API on a free local port; runs `holdfast migrate`; creates a
# producer API key with `holdfast key create`; runs pytest
# (clients/python/tests), which creates its accounts and credits with
# `holdfast account grant`. Afterwards the server is stopped and the
# database, virtual host (or, without one, the namespace's queues) are
# removed, whatever happened.
#
# The tests find the fleet in these variables:
#   HOLDFAST_TEST_AMQP_URL   broker URL (with the virtual host)
#   HOLDFAST_TEST_HTTP_URL   the HTTP API
#   HOLDFAST_TEST_KEY        a producer API key of every account
#   HOLDFAST_TEST_NAMESPACE  the fleet's namespace
#   HOLDFAST_TEST_PRODUCER_AMQP_URL  the same broker as a least-privilege
#                            producer user (scripts/rabbitmq-users.sh; only
#                            with a virtual host of our own)
#   HOLDFAST_BIN, HOLDFAST_DATABASE_URL   the CLI, for accounts and credits
#
# Extra arguments go to pytest (`bash scripts/python-client-test.sh -k events`).
# KEEP=1 keeps the server log. Needs PostgreSQL and RabbitMQ on their local
# ports (make services), python3 (3.10 or later) with venv and pip, curl, psql.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
export PATH="$PATH:/usr/sbin:/sbin"

PG_BASE="${HOLDFAST_TEST_PG:-postgres://postgres@127.0.0.1:5432}"
AMQP_BASE="${HOLDFAST_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672}"
PKG="$ROOT/clients/python"
VENV="$PKG/.venv"

log() { echo "python-client: $*" >&2; }
die() {
    log "$*"
    exit 1
}

# ------------------------------------------------------------ the package
if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv)"
fi
log "installing the package and its test extras"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$PKG[test]" ||
    die "pip install failed"
log "mypy --strict"
(cd "$PKG" && "$VENV/bin/mypy" --strict src/holdfast_client tests) || die "mypy --strict found problems"

# ------------------------------------------------------------------ build
cargo build --quiet --bin holdfast
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
export HOLDFAST_BIN="$TARGET_DIR/debug/holdfast"

# ---------------------------------------------------------- isolation
RUN_ID="$(date +%s)_$$"
DB="hf_pyclient_${RUN_ID}"
NS="hf-pyclient-${RUN_ID}"
VHOST=""
PRODUCER_USER=""
WORK="$(mktemp -d "${TMPDIR:-/tmp}/holdfast-pyclient.XXXXXX")"
SERVER_PID=""
STATUS=1
cleanup() {
    set +e
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID"
        for _ in $(seq 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID"
        wait "$SERVER_PID" 2>/dev/null
    fi
    if [ -n "$PRODUCER_USER" ]; then
        rabbitmqctl -q delete_user -- "$PRODUCER_USER" >/dev/null 2>&1 || log "could not delete user $PRODUCER_USER"
    fi
    if [ -n "$VHOST" ]; then
        rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || log "could not delete vhost $VHOST"
    else
        for q in requests jobs previews requests.dead jobs.dead; do
            rabbitmqctl -q delete_queue "$NS.$q" >/dev/null 2>&1
        done
    fi
    psql -q -w "$PG_BASE/postgres" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 ||
        log "could not drop database $DB"
    if [ "$STATUS" = 0 ] && [ -z "${KEEP:-}" ]; then
        rm -rf "$WORK"
    else
        log "server log kept: $WORK/server.log"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

AMQP_URL="$AMQP_BASE/%2f"
if rabbitmqctl -q add_vhost "$NS" >/dev/null 2>&1; then
    VHOST="$NS"
    rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
    AMQP_URL="$AMQP_BASE/$VHOST"
else
    log "rabbitmqctl unavailable: using the default virtual host"
fi
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export HOLDFAST_DATABASE_URL="$PG_BASE/$DB"
export HOLDFAST_AMQP_URL="$AMQP_URL"
export HOLDFAST_NAMESPACE="$NS"
export HOLDFAST_TEST_AMQP_URL="$AMQP_URL"
export HOLDFAST_TEST_HTTP_URL="http://127.0.0.1:$PORT"
export HOLDFAST_TEST_NAMESPACE="$NS"

# A least-privilege producer broker user (docs/security.md, "Broker users"):
# it may publish to the intake and use its own reply queues, nothing more.
if [ -n "$VHOST" ]; then
    PRODUCER_USER="$NS-producer"
    PRODUCER_PASSWORD="$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    HOLDFAST="$HOLDFAST_BIN" RABBITMQ_VHOST="$VHOST" \
        bash scripts/rabbitmq-users.sh create producer "$PRODUCER_USER" "$PRODUCER_PASSWORD" >/dev/null ||
        die "could not create the producer broker user"
    BROKER="${AMQP_BASE#*://}"
    export HOLDFAST_TEST_PRODUCER_AMQP_URL="amqp://$PRODUCER_USER:$PRODUCER_PASSWORD@${BROKER#*@}/$VHOST"
fi


# ------------------------------------------------------------------ fleet
"$HOLDFAST_BIN" migrate >"$WORK/migrate.log" 2>&1 || die "holdfast migrate failed (see $WORK/migrate.log)"
# Progress is coalesced per 200 ms (not 1 s) so that a batch of a few
# seconds reports it; the reconciler sweeps every 500 ms.
"$HOLDFAST_BIN" run --http-addr "127.0.0.1:$PORT" \
    --progress-interval-ms 200 --sweep-interval-ms 500 \
    >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 150); do
    curl -fsS -m 2 "$HOLDFAST_TEST_HTTP_URL/readyz" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "holdfast run exited (see $WORK/server.log)"
    sleep 0.2
done
curl -fsS -m 2 "$HOLDFAST_TEST_HTTP_URL/readyz" >/dev/null 2>&1 || die "the server did not become ready"

# A producer key, made the way an operator makes one (the key is the first line).
KEY="$("$HOLDFAST_BIN" key create --scope producer --all-accounts --expires-in 1 \
    --name "python client tests" 2>/dev/null)" || die "holdfast key create failed"
KEY="${KEY%%$'\n'*}"
case "$KEY" in
hf_live_*) ;;
*) die "holdfast key create did not print a key" ;;
esac
export HOLDFAST_TEST_KEY="$KEY"

# ------------------------------------------------------------------ tests
log "fleet on $HOLDFAST_TEST_HTTP_URL, namespace $NS; running pytest"
set +e
(cd "$PKG" && "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@")
STATUS=$?
set -e
if grep -q "panicked" "$WORK/server.log"; then
    log "the server panicked during the tests (see $WORK/server.log)"
    STATUS=1
fi
exit "$STATUS"
