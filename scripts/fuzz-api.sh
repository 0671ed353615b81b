#!/usr/bin/env bash
# Fuzz the HTTP API against its own OpenAPI document with schemathesis.
#
# Starts `holdfast run` (every role) on a database, AMQP namespace and (where
# rabbitmqctl is usable) RabbitMQ virtual host of its own, with the API on a
# free local port and no admin token; creates an admin API key with `holdfast
# key create` and sends it with every request; seeds the account `acme` (the
# document's example account); runs schemathesis with these checks (the
# key's rate limit is raised, so that the run reaches the handlers rather
# than the 429 it would get at the default rate):
#   not_a_server_error          no 5xx, whatever the input
#   status_code_conformance     every status is documented
#   content_type_conformance    every body has its documented media type
#   response_schema_conformance every body matches its documented schema
#   response_headers_conformance documented headers are present
#   ignored_auth                an operation that declares the api_key scheme
#                               refuses a request without the key, or with a wrong one
# then stops the server and removes the database and virtual host. Exits
# non-zero when schemathesis finds a failure (or cannot run).
#
#   HOLDFAST_FUZZ_EXAMPLES  test cases per operation and phase (default 300)
#   HOLDFAST_FUZZ_SEED      schemathesis seed (default: random, printed)
#   HOLDFAST_FUZZ_PG        PostgreSQL server URL without database
#                           (default postgres://postgres@127.0.0.1:5432)
#   HOLDFAST_FUZZ_AMQP      RabbitMQ server URL without vhost
#                           (default amqp://guest:guest@127.0.0.1:5672)
# Needs: python3 with pip (schemathesis is installed if missing), curl, psql.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

EXAMPLES="${HOLDFAST_FUZZ_EXAMPLES:-300}"
SEED="${HOLDFAST_FUZZ_SEED:-$RANDOM$RANDOM}"
PG_BASE="${HOLDFAST_FUZZ_PG:-postgres://postgres@127.0.0.1:5432}"
AMQP_BASE="${HOLDFAST_FUZZ_AMQP:-amqp://guest:guest@127.0.0.1:5672}"
export PATH="$PATH:/usr/sbin:/sbin"

RUN_ID="$(date +%s)_$$"
DATABASE="hf_fuzz_${RUN_ID}"
NAMESPACE="hf-fuzz-${RUN_ID}"
VHOST=""

log() { echo "fuzz-api: $*" >&2; }

# ------------------------------------------------------------ schemathesis
SCRIPTS_DIR="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
find_st() {
    if [ -x "$SCRIPTS_DIR/st" ]; then
        echo "$SCRIPTS_DIR/st"
    elif command -v st >/dev/null 2>&1; then
        command -v st
    fi
}
ST="$(find_st)"
if [ -z "$ST" ]; then
    log "installing schemathesis from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check schemathesis
    ST="$(find_st)"
fi
if [ -z "$ST" ]; then
    log "schemathesis is installed but its \`st\` command was not found"
    exit 1
fi
log "$("$ST" --version)"

# ------------------------------------------------------------------ build
cargo build --quiet --bin holdfast
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
HOLDFAST="$TARGET_DIR/debug/holdfast"
REPORT_DIR="$TARGET_DIR/fuzz-api"
mkdir -p "$REPORT_DIR"
SERVER_LOG="$REPORT_DIR/server.log"

# ---------------------------------------------------------- isolation
# A virtual host of our own is removed whole afterwards; without rabbitmqctl
# (not root) the namespace alone isolates, and its queues stay behind.
AMQP_URL="$AMQP_BASE/%2f"
if rabbitmqctl -q add_vhost "$NAMESPACE" >/dev/null 2>&1; then
    VHOST="$NAMESPACE"
    rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' >/dev/null
    AMQP_URL="$AMQP_BASE/$VHOST"
else
    log "rabbitmqctl unavailable: using the default virtual host; queues named $NAMESPACE.* will remain"
fi
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
BASE="http://127.0.0.1:$PORT"

SERVER_PID=""
cleanup() {
    local code=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    psql -q -w "$PG_BASE/postgres" -c "DROP DATABASE IF EXISTS \"$DATABASE\" WITH (FORCE)" >/dev/null 2>&1 ||
        log "could not drop database $DATABASE"
    if [ -n "$VHOST" ]; then
        rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || log "could not delete vhost $VHOST"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# What RabbitMQ logs from the server's start on is shown if the broker closes a connection.
RABBIT_LOG="$(ls /var/log/rabbitmq/rabbit@*.log 2>/dev/null | grep -v -E '_upgrade|_sasl' | head -n 1 || true)"
RABBIT_LOG_START=0
if [ -n "$RABBIT_LOG" ] && [ -r "$RABBIT_LOG" ]; then
    RABBIT_LOG_START="$(wc -c <"$RABBIT_LOG")"
else
    RABBIT_LOG=""
fi

# ------------------------------------------------------------------ server
log "starting holdfast on $BASE (database $DATABASE, namespace $NAMESPACE)"
"$HOLDFAST" run \
    --database-url "$PG_BASE/$DATABASE" \
    --amqp-url "$AMQP_URL" \
    --namespace "$NAMESPACE" \
    --http-addr "127.0.0.1:$PORT" \
    --sweep-interval-ms 500 \
    --http-key-rate 10000 --http-key-burst 10000 \
    >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

for _ in $(seq 1 120); do
    if curl -fsS -m 2 "$BASE/readyz" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "the server exited; its log:"
        tail -n 50 "$SERVER_LOG" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fsS -m 2 "$BASE/readyz" >/dev/null || {
    log "the server did not become ready; its log:"
    tail -n 50 "$SERVER_LOG" >&2
    exit 1
}
# An admin key, made the way an operator makes one (the first line printed is the key).
KEY="$(HOLDFAST_DATABASE_URL="$PG_BASE/$DATABASE" "$HOLDFAST" key create --scope admin \
    --expires-in 1 --name "fuzz run" 2>/dev/null)" || true
KEY="${KEY%%$'\n'*}"
case "$KEY" in
hf_live_*) ;;
*)
    log "holdfast key create did not print a key"
    exit 1
    ;;
esac
curl -fsS -m 5 -X POST "$BASE/v1/accounts/acme/grants" \
    -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
    -d '{"amount": 1000000000, "create": true, "note": "fuzz seed"}' >/dev/null

# Ready again after a broker-side close: /readyz answers and (in a virtual
# host of our own) every queue has as many consumers as when the run began.
consumers() {
    if [ -n "$VHOST" ]; then
        rabbitmqctl -q list_consumers -p "$VHOST" queue_name 2>/dev/null | sort | uniq -c
    fi
}
CONSUMERS_AT_START="$(consumers)"
recovered() {
    for _ in $(seq 1 60); do
        if curl -fsS -m 2 "$BASE/readyz" >/dev/null 2>&1 &&
            [ "$(consumers)" = "$CONSUMERS_AT_START" ]; then
            return 0
        fi
        sleep 0.5
    done
    return 1
}

# ---------------------------------------------------------------- fuzzing
log "schemathesis: $EXAMPLES examples per operation, seed $SEED"
status=0
# Run where the reports go: schemathesis keeps its cache in the working directory.
(cd "$REPORT_DIR" && "$ST" run "$BASE/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,ignored_auth \
    --header "Authorization: Bearer $KEY" \
    --max-examples "$EXAMPLES" \
    --seed "$SEED" \
    --request-timeout 30 \
    --suppress-health-check all \
    --report junit --report-dir "$REPORT_DIR" \
    --output-truncate false) || status=$?

# The server's own errors fail the run. A connection the broker closed is the
# broker's event, not the API's: lapin logs it at ERROR and the role that lost
# it reconnects (a WARN of ours). Such lines (lapin's, naming the broker's
# reply code or hard error; any other line of lapin's at ERROR is ours to fix)
# are shown with what RabbitMQ logged meanwhile, and the run fails only if the
# server did not recover.
# Levels are matched in their column: a WARN line may quote the broker's
# "INTERNAL_ERROR" in its message.
ERROR_LINE='^[0-9TZ:.-]+ +ERROR '
# lapin's lines about a close the broker sent: its reply code, or its AMQP hard error.
BROKER_CLOSE="${ERROR_LINE}lapin::.*(reply_code|AMQP hard error)"
grep -E "panicked|$ERROR_LINE" "$SERVER_LOG" | grep -v -E "$BROKER_CLOSE" >"$REPORT_DIR/errors.log" || true
grep -E "$BROKER_CLOSE" "$SERVER_LOG" >"$REPORT_DIR/broker.log" || true
if [ -s "$REPORT_DIR/errors.log" ]; then
    log "the server logged errors (see $SERVER_LOG):"
    head -n 20 "$REPORT_DIR/errors.log" >&2
    status=1
fi
if [ -s "$REPORT_DIR/broker.log" ]; then
    log "the broker closed connections during the run:"
    head -n 10 "$REPORT_DIR/broker.log" >&2
    if [ -n "$RABBIT_LOG" ]; then
        log "RabbitMQ's errors and warnings meanwhile ($RABBIT_LOG):"
        tail -c "+$((RABBIT_LOG_START + 1))" "$RABBIT_LOG" | grep -E -A 30 '\[(error|warning)\]' | head -n 80 >&2 || true
    fi
    if recovered; then
        log "every role reconnected and the server is ready again"
    else
        log "the server did not recover from the broker's close"
        status=1
    fi
fi
if [ "$status" -ne 0 ]; then
    log "FAILED (seed $SEED); server log: $SERVER_LOG"
else
    log "passed (seed $SEED)"
fi
exit "$status"
