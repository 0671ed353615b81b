#!/usr/bin/env bash
# A Holdfast fleet of real processes on the local services: the same shape as
# docker/compose.yml (migrate, 2 coordinators, 3 workers, 1 reconciler), each
# role in its own process with its own HTTP port (/metrics, /healthz, /readyz).
#
#   scripts/fleet.sh start    migrate, start every process, wait until each is ready
#   scripts/fleet.sh status   one line per process: pid, port, alive, ready
#   scripts/fleet.sh stop     stop the processes this fleet started (and only those)
#   scripts/fleet.sh ports    print "role port" per process (for scrape configs)
#
# Settings (environment):
#   HOLDFAST_FLEET_DIR           logs and pid file           (default target/fleet)
#   HOLDFAST_FLEET_PORT          first HTTP port; each process takes the next one
#                                                            (default 18080)
#   HOLDFAST_FLEET_COORDINATORS  coordinator processes       (default 2)
#   HOLDFAST_FLEET_WORKERS       worker processes            (default 3)
#   HOLDFAST_FLEET_RECONCILERS   reconciler processes        (default 1)
#   HOLDFAST_FLEET_READY_SECS    how long start waits for /readyz (default 60)
#   HOLDFAST_FLEET_STOP_SECS     how long stop waits before SIGKILL (default 45)
#   HOLDFAST_BIN                 the binary                  (default target/debug/holdfast)
# Every other HOLDFAST_* variable (HOLDFAST_NAMESPACE, HOLDFAST_DATABASE_URL,
# HOLDFAST_AMQP_URL, HOLDFAST_LOG_JSON, ...) is passed to every process as is.
#
# The pid file records each process's pid and kernel start time; `stop` signals
# a pid only while both still match, so a pid reused by another program after
# a crash is never touched.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR="${HOLDFAST_FLEET_DIR:-target/fleet}"
PORT0="${HOLDFAST_FLEET_PORT:-18080}"
COORDINATORS="${HOLDFAST_FLEET_COORDINATORS:-2}"
WORKERS="${HOLDFAST_FLEET_WORKERS:-3}"
RECONCILERS="${HOLDFAST_FLEET_RECONCILERS:-1}"
READY_SECS="${HOLDFAST_FLEET_READY_SECS:-60}"
STOP_SECS="${HOLDFAST_FLEET_STOP_SECS:-45}"
BIN="${HOLDFAST_BIN:-target/debug/holdfast}"
PIDS="$DIR/fleet.pids"

say() { echo "fleet: $*"; }
die() {
    echo "fleet: $*" >&2
    exit 1
}

# Field 22 of /proc/PID/stat: start time in clock ticks since boot. The comm
# field (2) may contain spaces, so cut everything up to its closing paren.
start_time() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    # After the cut, field 3 (state) is the first: start time is the 20th.
    # A zombie (Z) or dead (X) process has exited: it is not running.
    set -- $stat
    case "$1" in Z | X) return 1 ;; esac
    echo "${20}"
}

# True if pid $1 is alive and still the process recorded with start time $2.
ours() {
    local now
    now="$(start_time "$1")" || return 1
    [ "$now" = "$2" ]
}

port_open() {
    timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

ready() {
    curl -fsS -m 2 "http://127.0.0.1:$1/readyz" >/dev/null 2>&1
}

# The processes to run: "name role port", in start order.
plan() {
    local port=$PORT0 i
    for ((i = 1; i <= COORDINATORS; i++)); do
        echo "coordinator-$i coordinator $port"
        port=$((port + 1))
    done
    for ((i = 1; i <= WORKERS; i++)); do
        echo "worker-$i worker $port"
        port=$((port + 1))
    done
    for ((i = 1; i <= RECONCILERS; i++)); do
        echo "reconciler-$i reconciler $port"
        port=$((port + 1))
    done
}

# Recorded processes still alive: "name pid start port" lines.
alive() {
    [ -f "$PIDS" ] || return 0
    local name pid start port
    while read -r name pid start port; do
        if ours "$pid" "$start"; then
            echo "$name $pid $start $port"
        fi
    done <"$PIDS"
}

cmd_stop() {
    if [ ! -f "$PIDS" ]; then
        say "nothing to stop (no $PIDS)"
        return 0
    fi
    local name pid start port left waited=0
    while read -r name pid start port; do
        if ours "$pid" "$start"; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done <"$PIDS"
    # Workers finish their in-flight items before exiting.
    while left="$(alive)" && [ -n "$left" ]; do
        if [ "$waited" -ge "$((STOP_SECS * 5))" ]; then
            while read -r name pid start port; do
                say "$name (pid $pid) still running after ${STOP_SECS}s: SIGKILL"
                ours "$pid" "$start" && kill -KILL "$pid" 2>/dev/null || true
            done <<<"$left"
            sleep 0.5
            break
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    rm -f "$PIDS"
    say "stopped (logs in $DIR)"
}

cmd_status() {
    if [ ! -f "$PIDS" ]; then
        say "not running (no $PIDS)"
        return 1
    fi
    local name pid start port state health bad=0
    printf '%-16s %8s %6s  %-6s %s\n' process pid port state ready
    while read -r name pid start port; do
        if ours "$pid" "$start"; then
            state=up
            if ready "$port"; then health=yes; else health=no bad=1; fi
        else
            state=gone health=- bad=1
        fi
        printf '%-16s %8s %6s  %-6s %s\n' "$name" "$pid" "$port" "$state" "$health"
    done <"$PIDS"
    return "$bad"
}

cmd_ports() {
    local name role port
    plan | while read -r name role port; do echo "$role $port"; done
}

start_failed() {
    echo "fleet: start failed; stopping what was started" >&2
    cmd_stop >&2
    exit 1
}

cmd_start() {
    [ -x "$BIN" ] || die "no binary at $BIN (run cargo build, or set HOLDFAST_BIN)"
    mkdir -p "$DIR"
    if [ -n "$(alive)" ]; then
        die "already running (see '$0 status'; '$0 stop' first)"
    fi
    rm -f "$PIDS"
    local name role port
    while read -r name role port; do
        if port_open "$port"; then
            die "port $port (for $name) is taken: set HOLDFAST_FLEET_PORT"
        fi
    done < <(plan)

    say "namespace ${HOLDFAST_NAMESPACE:-holdfast}, logs in $DIR"
    # The migrate step: once, before any role starts (as in compose.yml).
    if ! "$BIN" migrate >"$DIR/migrate.log" 2>&1; then
        cat "$DIR/migrate.log" >&2
        die "migrate failed"
    fi
    say "migrate: $(tail -1 "$DIR/migrate.log")"

    local pid
    while read -r name role port; do
        # setsid: the process gets its own session, so a Ctrl-C in the
        # terminal that ran `start` does not reach it; `stop` does.
        setsid "$BIN" "$role" --http-addr "127.0.0.1:$port" \
            </dev/null >"$DIR/$name.log" 2>&1 &
        pid=$!
        echo "$name $pid $(start_time "$pid") $port" >>"$PIDS"
    done < <(plan)

    local deadline=$((SECONDS + READY_SECS)) pending
    while :; do
        pending=""
        while read -r name pid start port; do
            if ! ours "$pid" "$start"; then
                echo "fleet: $name exited; the end of $DIR/$name.log:" >&2
                tail -20 "$DIR/$name.log" >&2
                start_failed
            fi
            ready "$port" || pending="$pending $name"
        done <"$PIDS"
        [ -z "$pending" ] && break
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "fleet: not ready after ${READY_SECS}s:$pending" >&2
            start_failed
        fi
        sleep 0.3
    done
    while read -r name pid start port; do
        say "$name ready: pid $pid, http://127.0.0.1:$port/metrics"
    done <"$PIDS"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
ports) cmd_ports ;;
*)
    echo "usage: $0 start|stop|status|ports" >&2
    exit 2
    ;;
esac
