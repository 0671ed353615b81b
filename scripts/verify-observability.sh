#!/usr/bin/env bash
# Prove the dashboard and the alert rules against real data.
#
# 1. Installs Prometheus (Debian's package, which brings promtool) if missing
#    and enables RabbitMQ's rabbitmq_prometheus plugin (port 15692) if needed.
# 2. promtool: check the alert rules, run their unit tests, check the config.
# 3. Starts a fleet of real processes (scripts/fleet.sh: 2 coordinators,
#    3 workers, 1 reconciler) in a namespace and database of its own, with
#    JSON logs and a password in its PostgreSQL URL.
# 4. Starts a Prometheus server on a free local port with a temporary data
#    directory, scraping every fleet process and RabbitMQ every second, with
#    docker/prometheus/alerts.yml loaded. Its jobs are the ones of
#    docker/prometheus/prometheus.yml (checked), only the targets differ.
# 5. Grants credits over the admin API (every source; a plan allowance and a
#    promotion expire a few seconds later, in the reconciler's sweep) and
#    drives a scenario with `holdfast submit`: granted batches, an
#    insufficient one, a failing item, an overrun, rejected requests.
# 6. Runs scripts/check-observability.py: every panel query of
#    docker/grafana/dashboards/holdfast.json and every alert rule is evaluated
#    through Prometheus's HTTP API and must parse and return series; the
#    scenario's numbers must show up exactly (credits granted and expired by
#    source included); the logs must be JSON, carry the batch ids, name the
#    expired grants, and contain no credentials.
# Stops everything it started. Exit code 0 only if every check passed.
#
#   scripts/verify-observability.sh          (make observability)
#   KEEP=1 scripts/verify-observability.sh   keep the work directory (logs, TSDB)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

STARTED=$SECONDS
STAMP="$(date +%H%M%S)$$"
NS="obs-verify-$STAMP"
DB="holdfast_obs_verify_$STAMP"
# The password is not needed (local trust auth) but must never reach a log.
SECRET="obs-pw-$STAMP"
# The admin token of the fleet's HTTP API (grants); it must never reach a log either.
ADMIN_TOKEN="obs-admin-$STAMP-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
DB_URL="postgres://postgres:$SECRET@127.0.0.1:5432/$DB"
ADMIN_URL="postgres://postgres@127.0.0.1:5432/postgres"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/holdfast-observability.XXXXXX")"
FLEET_DIR="$WORK/fleet"
PROM_PID=""
PROM_START=""
FLEET_STARTED=0
STATUS=1
# Checks passed and failed, for the closing line.
PASSED=0
FAILED=0

SUDO=()
[ "$(id -u)" -ne 0 ] && SUDO=(sudo)

step() { printf '\n== %s (%ss)\n' "$*" "$((SECONDS - STARTED))"; }
die() {
    echo "verify-observability: $*" >&2
    exit 1
}

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# A free port, then a run of free ones: probe from a random start.
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
free_run() {
    local n=$1 p i ok
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 20000)) ok=1
        for ((i = 0; i < n; i++)); do
            port_open $((p + i)) && ok=0 && break
        done
        [ "$ok" = 1 ] && echo "$p" && return
    done
    die "no run of $n free ports found"
}

proc_start() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    set -- $stat
    case "$1" in Z | X) return 1 ;; esac
    echo "${20}"
}

cleanup() {
    set +e
    if [ -n "$PROM_PID" ] && [ "$(proc_start "$PROM_PID")" = "$PROM_START" ]; then
        kill -TERM "$PROM_PID"
        for _ in $(seq 50); do
            [ "$(proc_start "$PROM_PID")" = "$PROM_START" ] || break
            sleep 0.1
        done
        [ "$(proc_start "$PROM_PID")" = "$PROM_START" ] && kill -KILL "$PROM_PID"
    fi
    if [ "$FLEET_STARTED" = 1 ]; then
        HOLDFAST_FLEET_DIR="$FLEET_DIR" HOLDFAST_FLEET_STOP_SECS=20 scripts/fleet.sh stop >/dev/null
        # Every queue of the namespace (the exchanges are left: rabbitmqctl cannot delete them).
        "${SUDO[@]}" rabbitmqctl -q --no-table-headers list_queues name 2>/dev/null |
            grep -F "$NS." | while read -r q; do
                "${SUDO[@]}" rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null 2>&1
            done
        psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1
    fi
    if [ "$STATUS" = 0 ] && [ -z "${KEEP:-}" ]; then
        rm -rf "$WORK"
    else
        echo "verify-observability: logs and data kept in $WORK"
    fi
    echo "verify-observability: $([ "$STATUS" = 0 ] && echo PASSED || echo FAILED) in $((SECONDS - STARTED))s"
    [ "$STATUS" != 0 ] && [ "$FAILED" = 0 ] && FAILED=1
    echo "observability: $PASSED passed, $FAILED failed"
}
trap cleanup EXIT

# ------------------------------------------------------------------ tools
step "tools"
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "prometheus: not installed, installing Debian's package"
    # Keep the package from starting its own server on :9090 (containers
    # often have no policy-rc.d; a temporary one says 'do not start').
    tmp_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod +x /usr/sbin/policy-rc.d
        tmp_policy=1
    fi
    apt_install() {
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
    }
    if ! apt_install >"$WORK/apt.log" 2>&1; then
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$WORK/apt.log" 2>&1
        apt_install >>"$WORK/apt.log" 2>&1 || {
            tail -20 "$WORK/apt.log" >&2
            [ "$tmp_policy" = 1 ] && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
            die "could not install prometheus"
        }
    fi
    [ "$tmp_policy" = 1 ] && "${SUDO[@]}" rm -f /usr/sbin/policy-rc.d
fi
prometheus --version 2>&1 | head -1
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"

if ! port_open 15692; then
    echo "rabbitmq: enabling the rabbitmq_prometheus plugin"
    "${SUDO[@]}" rabbitmq-plugins enable rabbitmq_prometheus >"$WORK/rabbitmq-plugins.log" 2>&1 ||
        { cat "$WORK/rabbitmq-plugins.log" >&2; die "could not enable rabbitmq_prometheus"; }
    for _ in $(seq 60); do port_open 15692 && break; sleep 0.5; done
    port_open 15692 || die "rabbitmq_prometheus is not listening on 15692"
fi
echo "rabbitmq_prometheus: listening on 127.0.0.1:15692"

# ---------------------------------------------------------------- promtool
step "promtool"
promtool check rules docker/prometheus/alerts.yml
promtool test rules docker/prometheus/alerts.test.yml
promtool check config docker/prometheus/prometheus.yml
PASSED=$((PASSED + 3))

# ------------------------------------------------------------------- fleet
step "fleet"
if [ -z "${HOLDFAST_BIN:-}" ]; then
    cargo build --quiet --bin holdfast
    export HOLDFAST_BIN="$ROOT/target/debug/holdfast"
fi
BIN="$HOLDFAST_BIN"
FLEET_PORT="$(free_run 6)"
export HOLDFAST_NAMESPACE="$NS" HOLDFAST_DATABASE_URL="$DB_URL"
export HOLDFAST_AMQP_URL="${HOLDFAST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export HOLDFAST_LOG_JSON=true HOLDFAST_SWEEP_INTERVAL_MS=1000 HOLDFAST_AUDIT_EVERY=2
export HOLDFAST_ADMIN_TOKEN="$ADMIN_TOKEN"
FLEET_STARTED=1
HOLDFAST_FLEET_DIR="$FLEET_DIR" HOLDFAST_FLEET_PORT="$FLEET_PORT" scripts/fleet.sh start

# -------------------------------------------------------------- prometheus
step "prometheus"
PROM_PORT="$(free_port)"
targets() {
    HOLDFAST_FLEET_PORT="$FLEET_PORT" scripts/fleet.sh ports |
        awk -v r="$1" '$1 == r { printf "%s\"127.0.0.1:%s\"", (n++ ? ", " : ""), $2 }'
}
cp docker/prometheus/alerts.yml "$WORK/alerts.yml"
cat >"$WORK/prometheus.yml" <<EOF
# Generated by scripts/verify-observability.sh: the jobs of
# docker/prometheus/prometheus.yml, with this fleet's local targets.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - alerts.yml
scrape_configs:
  - job_name: holdfast-coordinator
    static_configs:
      - targets: [$(targets coordinator)]
  - job_name: holdfast-worker
    static_configs:
      - targets: [$(targets worker)]
  - job_name: holdfast-reconciler
    static_configs:
      - targets: [$(targets reconciler)]
  - job_name: rabbitmq
    static_configs:
      - targets: ["127.0.0.1:15692"]
  - job_name: rabbitmq-queues
    metrics_path: /metrics/detailed
    params:
      family: [queue_coarse_metrics, queue_consumer_count]
    static_configs:
      - targets: ["127.0.0.1:15692"]
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$PROM_PORT"]
EOF
jobs_of() { grep -E '^\s*- job_name:' "$1" | awk '{print $3}' | sort | tr '\n' ' '; }
[ "$(jobs_of "$WORK/prometheus.yml")" = "$(jobs_of docker/prometheus/prometheus.yml)" ] ||
    die "local jobs ($(jobs_of "$WORK/prometheus.yml")) differ from docker/prometheus/prometheus.yml ($(jobs_of docker/prometheus/prometheus.yml))"
promtool check config "$WORK/prometheus.yml" >/dev/null
setsid prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn \
    </dev/null >"$WORK/prometheus.log" 2>&1 &
PROM_PID=$!
PROM_START="$(proc_start "$PROM_PID")"
PROM="http://127.0.0.1:$PROM_PORT"
for _ in $(seq 100); do
    curl -fsS -m 1 "$PROM/-/ready" >/dev/null 2>&1 && break
    [ "$(proc_start "$PROM_PID")" = "$PROM_START" ] || { cat "$WORK/prometheus.log" >&2; die "prometheus exited"; }
    sleep 0.2
done
curl -fsS -m 1 "$PROM/-/ready" >/dev/null || die "prometheus not ready on $PROM"
echo "prometheus: $PROM (pid $PROM_PID), scraping every 1s"
# Every target up before the scenario starts.
for _ in $(seq 60); do
    down="$(curl -fsS "$PROM/api/v1/targets?state=active" |
        python3 -c 'import json,sys; t=json.load(sys.stdin)["data"]["activeTargets"]; print(len(t), sum(x["health"]!="up" for x in t))')" || down="0 -"
    [ "${down#* }" = 0 ] && [ "${down% *}" = 9 ] && break
    sleep 0.5
done
[ "${down#* }" = 0 ] || die "targets not all up (targets, down: $down)"
echo "targets: ${down% *} up"

# ---------------------------------------------------------------- scenario
step "scenario"
SC="$WORK/scenario"
mkdir -p "$SC"
ACME="$NS-acme"
POOR="$NS-poor"
GRANTS="$NS-grants"
# Grants go through a coordinator's admin API, so that the process that
# counts them (holdfast_credits_granted_total{source}) is one Prometheus
# scrapes; `holdfast account grant` would count them in its own short-lived
# process.
API="http://127.0.0.1:$(HOLDFAST_FLEET_PORT="$FLEET_PORT" scripts/fleet.sh ports | awk '$1 == "coordinator" && !p { p = $2 } END { print p }')"
grant() { # grant ACCOUNT JSON-BODY
    curl -sS -o "$SC/grant.out" -w '%{http_code}' -X POST "$API/v1/accounts/$1/grants" \
        -H "Authorization: Bearer $ADMIN_TOKEN" -H 'Content-Type: application/json' -d "$2" \
        >"$SC/grant.status" || die "POST $API/v1/accounts/$1/grants: no answer"
    [ "$(cat "$SC/grant.status")" = 200 ] ||
        die "POST /v1/accounts/$1/grants $2: HTTP $(cat "$SC/grant.status"): $(cat "$SC/grant.out")"
}
grant "$ACME" '{"amount": 1000000, "create": true}'
grant "$POOR" '{"amount": 10, "create": true}'
# An account with a grant of each other source; no batch uses it. The plan
# allowance and the promotion expire in a few seconds: the reconciler's sweep
# expires them whole (holdfast_credits_expired_total{source}); the top-up
# never expires.
SOON="$(date -u -d '+3 seconds' +%Y-%m-%dT%H:%M:%SZ)"
grant "$GRANTS" "{\"amount\": 100, \"source\": \"plan\", \"grant_id\": \"plan\", \"expires_at\": \"$SOON\", \"create\": true}"
grant "$GRANTS" "{\"amount\": 30, \"source\": \"promotion\", \"grant_id\": \"welcome\", \"expires_at\": \"$SOON\"}"
grant "$GRANTS" '{"amount": 50, "source": "purchase", "grant_id": "topup"}'
echo "  granted over $API: manual 1000010 ($ACME, $POOR); plan 100 and promotion 30 expiring at $SOON, purchase 50 ($GRANTS)"

# items PREFIX N COST [EXTRA-SIMULATE-JSON]: N items with latencies spread
# over 10..900 ms (so the histograms have something to show).
items() {
    local prefix=$1 n=$2 cost=$3 i sep=""
    for ((i = 1; i <= n; i++)); do
        printf '%s{"item_id":"%s-%02d","estimated_cost":%d,"payload":{"simulate":{"latency_ms":%d}}}' \
            "$sep" "$prefix" "$i" "$cost" $(((i * 137) % 900 + 10))
        sep=","
    done
}
batch() { # batch ID ACCOUNT ITEMS-JSON
    printf '{"batch_id":"%s","account_id":"%s","items":[%s]}\n' "$1" "$2" "$3" >"$SC/$1.json"
}
# submit ID EXPECTED-EXIT-CODE [--wait]
submit() {
    local id=$1 want=$2 rc=0
    "$BIN" submit "$SC/$id.json" ${3:-} --timeout 60 >"$SC/$id.out" 2>"$SC/$id.err" || rc=$?
    if [ "$rc" != "$want" ]; then
        echo "submit $id: exit $rc, expected $want" >&2
        cat "$SC/$id.out" "$SC/$id.err" >&2
        return 1
    fi
    echo "  $(head -1 "$SC/$id.out")"
}

# Five ordinary batches of 10 items, 12 credits each, at once.
for b in 1 2 3 4 5; do
    batch "$NS-gen-$b" "$ACME" "$(items "gen$b" 10 12)"
done
# One item fails (not charged), one costs less than estimated (the rest is released).
batch "$NS-fail" "$ACME" "$(items ok 3 12),{\"item_id\":\"broken\",\"estimated_cost\":12,\"payload\":{\"simulate\":{\"fail\":true}}},{\"item_id\":\"cheap\",\"estimated_cost\":12,\"payload\":{\"simulate\":{\"actual_cost\":5}}}"
# One item costs 999 against a reservation of 12: capped, overrun 987 recorded.
batch "$NS-overrun" "$ACME" "$(items fine 2 12),{\"item_id\":\"greedy\",\"estimated_cost\":12,\"payload\":{\"simulate\":{\"actual_cost\":999}}}"
# 3 x 12 = 36 credits against 10 available: insufficient, nothing starts.
batch "$NS-short" "$POOR" "$(items short 3 12)"
# Malformed: items is not a list; and a body that is not JSON at all.
printf '{"batch_id":"%s-bad","account_id":"%s","items":"none"}\n' "$NS" "$ACME" >"$SC/$NS-bad.json"
printf 'this is not json\n' >"$SC/$NS-garbage.json"

pids=()
for id in "$NS-gen-1" "$NS-gen-2" "$NS-gen-3" "$NS-gen-4" "$NS-gen-5" "$NS-fail" "$NS-overrun"; do
    submit "$id" 0 --wait &
    pids+=($!)
done
submit "$NS-short" 2 &
pids+=($!)
submit "$NS-bad" 3 &
pids+=($!)
submit "$NS-garbage" 3 &
pids+=($!)
for p in "${pids[@]}"; do wait "$p" || die "scenario step failed"; done
# Reserved: 7 granted batches. Captured: 12 per succeeded item, 5 for the
# cheap one, 12 (capped) for the greedy one. Released: the rest.
RESERVED=$((5 * 10 * 12 + 5 * 12 + 3 * 12))
CAPTURED=$((5 * 10 * 12 + 3 * 12 + 5 + 3 * 12))
RELEASED=$((RESERVED - CAPTURED))
echo "scenario: 10 requests in $((SECONDS - STARTED))s; reserved $RESERVED, captured $CAPTURED, released $RELEASED"

# ------------------------------------------------------------------ checks
step "waiting for the reconciler's gauges, an audit and a scrape"
# Everything settled in the ledger, the gauges refreshed and scraped.
q() { curl -fsS "$PROM/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "none")'; }
for _ in $(seq 60); do
    [ "$(q 'sum(holdfast_credits_released_total)')" = "$RELEASED" ] &&
        [ "$(q 'max(holdfast_holds_open)')" = 0 ] &&
        [ "$(q 'max(holdfast_ledger_drift)')" = 0 ] &&
        [ "$(q "sum(rabbitmq_detailed_queue_messages{queue=\"$NS.requests.dead\"})")" = 2 ] &&
        [ "$(q 'sum(holdfast_credits_expired_total)')" = 130 ] && break
    sleep 0.5
done
# Two more scrapes so that every rate() window holds the final values.
sleep 2

step "dashboard queries and alert rules against live data"
check_rc=0
python3 scripts/check-observability.py --summary "$WORK/summary" \
    --prometheus "$PROM" \
    --dashboard docker/grafana/dashboards/holdfast.json \
    --datasources docker/grafana/provisioning/datasources/prometheus.yml \
    --alerts docker/prometheus/alerts.yml \
    --var "namespace=$NS" --var "__rate_interval=1m" --var "__interval=15s" \
    --var "__range=$((SECONDS - STARTED + 60))s" \
    --expect "sum(holdfast_batches_total{decision=\"granted\"})=7" \
    --expect "sum(holdfast_batches_total{decision=\"insufficient\"})=1" \
    --expect "sum(holdfast_batches_total{decision=\"rejected\"})=2" \
    --expect "sum(holdfast_credits_reserved_total)=$RESERVED" \
    --expect "sum(holdfast_credits_captured_total)=$CAPTURED" \
    --expect "sum(holdfast_credits_released_total{reason=\"completed\"})=$RELEASED" \
    --expect "sum(holdfast_credits_granted_total{source=\"manual\"})=1000010" \
    --expect "sum(holdfast_credits_granted_total{source=\"plan\"})=100" \
    --expect "sum(holdfast_credits_granted_total{source=\"promotion\"})=30" \
    --expect "sum(holdfast_credits_granted_total{source=\"purchase\"})=50" \
    --expect "sum(holdfast_credits_expired_total{source=\"plan\"})=100" \
    --expect "sum(holdfast_credits_expired_total{source=\"promotion\"})=30" \
    --expect "sum(holdfast_credits_expired_total{source=\"purchase\"})=0" \
    --expect "sum(holdfast_credits_expired_total{source=\"manual\"})=0" \
    --expect "count(sum by (source) (holdfast_credits_expired_total))=4" \
    --expect "sum(holdfast_items_total{outcome=\"succeeded\"})=57" \
    --expect "sum(holdfast_items_total{outcome=\"failed\"})=1" \
    --expect "sum(holdfast_overrun_credits_total)=987" \
    --expect "sum(holdfast_batches_closed_total{state=\"completed\"})=7" \
    --expect "sum(holdfast_dead_lettered_total{queue=\"requests\"})=2" \
    --expect "sum(holdfast_item_seconds_count)=58" \
    --expect "sum(holdfast_reservation_seconds_count)=8" \
    --expect "sum(holdfast_batch_seconds_count)=7" \
    --expect "max(holdfast_credits_held)=0" \
    --expect "max(holdfast_holds_open)=0" \
    --expect "max(holdfast_holds_overdue)=0" \
    --expect "max(holdfast_dispatch_backlog)=0" \
    --expect "max(holdfast_ledger_drift)=0" \
    --expect "max(holdfast_ledger_stuck)=0" \
    --expect "sum(rabbitmq_detailed_queue_messages{queue=\"$NS.requests.dead\"})=2" \
    --expect "count(up{job=~\"holdfast-.*\"} == 1)=6" \
    --firing HoldfastOverrunCredits --firing HoldfastDeadLetterQueueGrowing \
    --quiet HoldfastLedgerDrift --quiet HoldfastStuckCredits --quiet HoldfastHoldsOverdue --quiet HoldfastProcessDown \
    --quiet HoldfastRoleDown --quiet HoldfastDispatchStalled || check_rc=$?
if [ -f "$WORK/summary" ]; then
    read -r p f <"$WORK/summary"
    PASSED=$((PASSED + p)) FAILED=$((FAILED + f))
fi
[ "$check_rc" = 0 ] || exit 1

step "logs"
python3 - "$FLEET_DIR" "$NS" "$SECRET" "$ADMIN_TOKEN" <<'EOF'
import glob, json, os, re, sys
fleet, ns, secret, token = sys.argv[1:]
credential = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@\"]+:[^@\s\"/]+@", re.I)
problems, lines, with_batch = [], 0, 0
mentioned, items, expired = set(), set(), set()
for path in sorted(glob.glob(os.path.join(fleet, "*.log"))):
    name = os.path.basename(path)
    for n, line in enumerate(open(path, errors="replace"), 1):
        line = line.rstrip("\n")
        where = f"{name}:{n}"
        if secret in line or token in line or "guest:guest" in line or credential.search(line):
            problems.append(f"{where}: a credential is logged: {line[:200]}")
        if name == "migrate.log":
            continue  # its last line is the command's own report on stdout
        lines += 1
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"{where}: not a JSON line: {line[:200]}")
            continue
        ids = {}
        for scope in [entry.get("fields", {}), entry.get("span", {})] + entry.get("spans", []):
            for key in ("batch_id", "item_id"):
                if key in scope:
                    ids[key] = str(scope[key])
        if "batch_id" in ids:
            with_batch += 1
            mentioned.add(ids["batch_id"])
        if ids.get("batch_id") and ids.get("item_id"):
            items.add((ids["batch_id"], ids["item_id"]))
        fields = entry.get("fields", {})
        if fields.get("message") == "grant expired" and fields.get("account") == f"{ns}-grants":
            expired.add(fields.get("grant"))
        # A line about one of this run's batches names it in a batch_id field
        # (lines about an account's grant name the account and the grant; a
        # connection's name, `<role>/<namespace>`, names no batch).
        about = {k: v for k, v in fields.items() if k not in ("account", "grant", "connection")}
        if ns in json.dumps(about) and ns not in ids.get("batch_id", "") and "queue" not in fields:
            problems.append(f"{where}: mentions a batch without a batch_id field: {line[:200]}")
expected = {f"{ns}-{b}" for b in ["gen-1", "gen-2", "gen-3", "gen-4", "gen-5", "fail", "overrun", "short", "bad"]}
for b in sorted(expected - mentioned):
    problems.append(f"no log line carries batch_id={b}")
# The failed item and the overrun are logged with both ids.
for b, i in [(f"{ns}-fail", "broken"), (f"{ns}-overrun", "greedy")]:
    if (b, i) not in items:
        problems.append(f"no log line carries batch_id={b} and item_id={i}")
# The reconciler logs each grant it expires, with the account and the grant.
for g in sorted({"plan", "welcome"} - expired):
    problems.append(f"no 'grant expired' line names account={ns}-grants grant={g}")
if expired - {"plan", "welcome"}:
    problems.append(f"grants expired that should not have: {sorted(expired - {'plan', 'welcome'})}")
print(f"logs: {lines} JSON lines, {with_batch} with a batch_id; all {len(expected)} decided batches named; "
      f"the 2 expired grants named; no credentials (searched for the database password, the admin token, "
      f"guest:guest and user:password@ URLs)")
for p in problems:
    print("  -", p)
sys.exit(1 if problems else 0)
EOF
PASSED=$((PASSED + 1))

step "metrics endpoints"
# Every process serves /metrics (checked by the scrape) and /healthz, /readyz.
HOLDFAST_FLEET_DIR="$FLEET_DIR" scripts/fleet.sh status
PASSED=$((PASSED + 1))

STATUS=0
