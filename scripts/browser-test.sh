#!/usr/bin/env bash
# End-to-end browser tests of the reference page (/demo).
#
# Builds Holdfast, starts `holdfast run` on a fresh database and AMQP
# namespace with the HTTP API on a free port (HOLDFAST_DEMO_GRANTS=1), grants
# credits to the demo account, creates producer keys limited to the accounts
# the page uses (`holdfast key create`), and runs tests/browser/demo.test.mjs
# (playwright-core, driving Debian's Chromium at /usr/bin/chromium; no browser
# is downloaded). The tests click through the page, check the ledger over
# HTTP and with `holdfast audit`, and save screenshots to docs/screenshots/.
# Afterwards the server is stopped and the database and queues are removed.
#
# Needs PostgreSQL and RabbitMQ on their local ports (make services), Node.js
# and npm. Installs the chromium package with apt-get if it is missing.
# Prints "browser: N passed, M failed" last; exits non-zero on any failure.
# KEEP=1 keeps the server log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
export PATH="$PATH:/usr/sbin:/sbin"

SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)

die() {
    echo "browser-test: $*" >&2
    echo "browser: 0 passed, 1 failed"
    exit 1
}

command -v node >/dev/null || die "Node.js is required (apt-get install nodejs npm)"
command -v npm >/dev/null || die "npm is required (apt-get install npm)"
if [ ! -x /usr/bin/chromium ]; then
    echo "browser-test: installing Debian's chromium"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null ||
        die "could not install chromium"
fi

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }
free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 20000))
        port_open "$p" || {
            echo "$p"
            return
        }
    done
    die "no free port found"
}

echo "browser-test: cargo build"
cargo build --quiet --bin holdfast
(cd tests/browser && npm install --silent --no-audit --no-fund >/dev/null) || die "npm install failed in tests/browser"

PORT="$(free_port)"
DB="hf_browser_$$"
NS="hf_browser_$$"
ADMIN_URL="postgres://postgres@127.0.0.1:5432/postgres"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/holdfast-browser.XXXXXX")"
export HOLDFAST_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export HOLDFAST_NAMESPACE="$NS"
export HOLDFAST_AMQP_URL="${HOLDFAST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export HOLDFAST_DEMO_GRANTS=1
HOLDFAST_ADMIN_TOKEN="browser-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export HOLDFAST_ADMIN_TOKEN
export HOLDFAST_BIN="$ROOT/target/debug/holdfast"
export HOLDFAST_BASE_URL="http://127.0.0.1:$PORT"
export HOLDFAST_DEMO_ACCOUNT="demo-studio"
export HOLDFAST_SCREENSHOTS="$ROOT/docs/screenshots"
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
    for q in requests jobs previews requests.dead jobs.dead; do
        "${SUDO[@]}" rabbitmqctl -q delete_queue "$NS.$q" >/dev/null 2>&1
    done
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1
    [ "$STATUS" = 0 ] && [ -z "${KEEP:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT

"$HOLDFAST_BIN" migrate >"$WORK/migrate.log" 2>&1 || die "holdfast migrate failed (see $WORK/migrate.log)"
"$HOLDFAST_BIN" run --http-addr "127.0.0.1:$PORT" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 150); do
    curl -fsS "$HOLDFAST_BASE_URL/readyz" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "holdfast run exited (see $WORK/server.log)"
    sleep 0.2
done
curl -fsS "$HOLDFAST_BASE_URL/readyz" >/dev/null 2>&1 || die "the server did not become ready"

"$HOLDFAST_BIN" account grant "$HOLDFAST_DEMO_ACCOUNT" 197 --create --note "browser test" >/dev/null ||
    die "holdfast account grant failed"
# The page gets a producer key limited to the demo account; the breakdown
# and spender tests one each, for the account they use. `key create` prints the key on
# its first line.
new_key() {
    local out
    out="$("$HOLDFAST_BIN" key create --scope producer --account "$1" --expires-in 1 \
        --name "browser test" 2>/dev/null)" || die "holdfast key create failed"
    echo "${out%%$'\n'*}"
}
HOLDFAST_DEMO_KEY="$(new_key "$HOLDFAST_DEMO_ACCOUNT")"
HOLDFAST_GRANTS_KEY="$(new_key "$HOLDFAST_DEMO_ACCOUNT-grants")"
HOLDFAST_TEAM_KEY="$(new_key "$HOLDFAST_DEMO_ACCOUNT-team")"
# For an account that does not exist yet: the page says how to create it.
HOLDFAST_NEW_KEY="$(new_key "$HOLDFAST_DEMO_ACCOUNT-new")"
export HOLDFAST_DEMO_KEY HOLDFAST_GRANTS_KEY HOLDFAST_TEAM_KEY HOLDFAST_NEW_KEY

echo "browser-test: server on $HOLDFAST_BASE_URL; its log is $WORK/server.log (kept on failure or with KEEP=1)"
set +e
node tests/browser/demo.test.mjs
STATUS=$?
set -e
exit "$STATUS"
