#!/usr/bin/env bash
# Make local PostgreSQL and RabbitMQ available for Holdfast development and CI.
#
# Safe to run any number of times: every step first checks whether it is
# needed, so on a machine where both services already run it only confirms.
#
#   PostgreSQL: 127.0.0.1:${HOLDFAST_PG_PORT:-5432}, user postgres, no password
#   RabbitMQ:   127.0.0.1:${HOLDFAST_AMQP_PORT:-5672}, default guest account
#
# The port variables only change which port is checked; they must match the
# ports the services are configured with (this script does not reconfigure).
# Target platform: Debian (apt, pg_ctlcluster, rabbitmq-server package).
set -euo pipefail

PG_HOST=127.0.0.1
PG_PORT="${HOLDFAST_PG_PORT:-5432}"
AMQP_HOST=127.0.0.1
AMQP_PORT="${HOLDFAST_AMQP_PORT:-5672}"
WAIT_SECONDS=90

# rabbitmq-server, rabbitmqctl and friends live in /usr/sbin, which is not
# on PATH for ordinary users.
export PATH="$PATH:/usr/sbin:/sbin"

# Use sudo only when we are not already root (CI containers run as root and
# often have no sudo installed).
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
fi

# ---------------------------------------------------------------- helpers

# True if something accepts TCP connections on host:port. Uses bash's
# /dev/tcp so no extra tools (nc, curl) are required.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

# Run `apt-get update` at most once per invocation, then install packages.
APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        APT_UPDATED=1
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@"
}

# Can we log in as postgres over TCP without a password? PGPASSWORD and
# ~/.pgpass are ignored so that a stored password cannot hide a missing
# trust rule; -w makes psql fail instead of prompting.
pg_trust_works() {
    env -u PGPASSWORD PGPASSFILE=/dev/null \
        psql -w -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres \
        -Atqc 'select 1' >/dev/null 2>&1
}

# ---------------------------------------------------------- installation

# PostgreSQL server: Debian puts versioned binaries under /usr/lib/postgresql.
if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    echo "postgresql: server not found, installing"
    apt_install postgresql
fi
# psql and pg_isready are used below and by developers.
if ! command -v psql >/dev/null || ! command -v pg_isready >/dev/null; then
    echo "postgresql: client not found, installing"
    apt_install postgresql-client
fi
if ! command -v rabbitmq-server >/dev/null; then
    echo "rabbitmq: server not found, installing"
    apt_install rabbitmq-server
fi

# ------------------------------------------------------------- PostgreSQL

# Debian keeps one config directory per major version under /etc/postgresql
# (the package's postinst creates cluster "main" there). Use the first
# version listed, normally the only one. If cluster "main" is missing, create
# it; with no config at all, for the newest installed server version.
PG_VERSION="$(ls /etc/postgresql 2>/dev/null | sort -V | head -1 || true)"
if [ -z "$PG_VERSION" ] || [ ! -d "/etc/postgresql/$PG_VERSION/main" ]; then
    PG_VERSION="${PG_VERSION:-$(ls /usr/lib/postgresql | sort -V | tail -1)}"
    echo "postgresql: no cluster found, creating $PG_VERSION/main"
    "${SUDO[@]}" pg_createcluster --port "$PG_PORT" "$PG_VERSION" main
fi

# --skip-systemctl-redirect: containers and CI machines usually have no
# systemd, so talk to the cluster directly instead of via systemctl.
pg_cluster() {
    "${SUDO[@]}" pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main "$@"
}

pg_action="already up"
pg_start=$SECONDS
if ! port_open "$PG_HOST" "$PG_PORT"; then
    # `pg_ctlcluster status` succeeds while the server is still starting up;
    # starting it a second time would be an error.
    if ! pg_cluster status >/dev/null 2>&1; then
        pg_cluster start
    fi
    pg_action="started"
fi

# An open port is not enough: the server refuses queries while it is still
# recovering. pg_isready reports when it really accepts connections.
while ! pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; do
    if [ $((SECONDS - pg_start)) -ge "$WAIT_SECONDS" ]; then
        echo "postgresql: not ready on $PG_HOST:$PG_PORT after ${WAIT_SECONDS}s" \
            "(see /var/log/postgresql/)" >&2
        exit 1
    fi
    sleep 1
done

# A fresh Debian install requires a password (scram-sha-256) for TCP logins.
# Tests connect as postgres without one, so put loopback-only trust rules in
# front (pg_hba.conf is first-match). Only done when the login fails, so a
# working setup is left untouched.
if ! pg_trust_works; then
    hba="/etc/postgresql/$PG_VERSION/main/pg_hba.conf"
    marker="# holdfast: trust loopback TCP logins (local development only)"
    if ! "${SUDO[@]}" grep -qxF "$marker" "$hba"; then
        echo "postgresql: adding loopback trust rules to $hba"
        "${SUDO[@]}" sed -i "1i $marker\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n" "$hba"
        pg_cluster reload
        sleep 1
    fi
    if ! pg_trust_works; then
        echo "postgresql: cannot log in as postgres on $PG_HOST:$PG_PORT without a password" >&2
        exit 1
    fi
fi
if [ "$pg_action" = "started" ]; then
    pg_action="started in $((SECONDS - pg_start))s"
fi
echo "postgresql: running on $PG_HOST:$PG_PORT ($pg_action)"

# --------------------------------------------------------------- RabbitMQ

rmq_action="already up"
rmq_start=$SECONDS
if ! port_open "$AMQP_HOST" "$AMQP_PORT"; then
    # If the Erlang node answers, the broker is merely still booting; a
    # second start would fail because the node name is taken.
    if ! "${SUDO[@]}" rabbitmqctl -q ping >/dev/null 2>&1; then
        # -detached returns at once; the broker keeps booting in the
        # background. The Debian wrapper switches to the rabbitmq user.
        "${SUDO[@]}" rabbitmq-server -detached >/dev/null 2>&1
    fi
    rmq_action="started"
fi

# Wait for the AMQP listener. RabbitMQ opens it late in its boot sequence,
# typically several seconds after the process starts.
while ! port_open "$AMQP_HOST" "$AMQP_PORT"; do
    if [ $((SECONDS - rmq_start)) -ge "$WAIT_SECONDS" ]; then
        echo "rabbitmq: port $AMQP_HOST:$AMQP_PORT not open after ${WAIT_SECONDS}s" \
            "(see /var/log/rabbitmq/)" >&2
        exit 1
    fi
    sleep 1
done

# The listener can be up before every boot step has finished; await_startup
# returns only once the broker application is fully running.
if command -v rabbitmqctl >/dev/null; then
    "${SUDO[@]}" timeout "$WAIT_SECONDS" rabbitmqctl -q await_startup >/dev/null
fi
if [ "$rmq_action" = "started" ]; then
    rmq_action="started in $((SECONDS - rmq_start))s"
fi
echo "rabbitmq: running on $AMQP_HOST:$AMQP_PORT ($rmq_action)"
