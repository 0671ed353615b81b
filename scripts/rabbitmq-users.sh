#!/usr/bin/env bash
# Per-role RabbitMQ users with least-privilege permissions on one namespace.
#
#   scripts/rabbitmq-users.sh create ROLE USER [PASSWORD]   # ROLE: producer|coordinator|worker|reconciler
#   scripts/rabbitmq-users.sh delete USER
#   scripts/rabbitmq-users.sh show ROLE                      # the three regexes, nothing changed
#
# The namespace is HOLDFAST_NAMESPACE (default `holdfast`), the vhost
# RABBITMQ_VHOST (default `/`). The regexes come from `holdfast
# amqp-permissions` (common/src/topology/names.rs), so they always match the
# names Holdfast uses; docs/security.md ("Broker users") explains each.
# Without PASSWORD, one is generated and printed once. HOLDFAST (default
# `holdfast` on the PATH) and RABBITMQCTL (default `rabbitmqctl`) name the
# programs. Re-running `create` for an existing user resets its password and
# permissions.
set -euo pipefail

HOLDFAST=${HOLDFAST:-holdfast}
RABBITMQCTL=${RABBITMQCTL:-rabbitmqctl}
VHOST=${RABBITMQ_VHOST:-/}

usage() {
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

permissions() {
    # configure, write, read: one a line.
    "$HOLDFAST" amqp-permissions "$1" | cut -f2
}

case "${1:-}" in
create)
    [ $# -ge 3 ] || usage
    role=$2 user=$3 password=${4:-}
    mapfile -t perms < <(permissions "$role")
    [ "${#perms[@]}" -eq 3 ] || { echo "could not compute the permissions of $role" >&2; exit 1; }
    generated=
    if [ -z "$password" ]; then
        password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 32)
        generated=1
    fi
    if "$RABBITMQCTL" -q list_users --no-table-headers | cut -f1 | grep -qxF -- "$user"; then
        "$RABBITMQCTL" -q change_password -- "$user" "$password" >/dev/null
    else
        "$RABBITMQCTL" -q add_user -- "$user" "$password" >/dev/null
    fi
    # No tags: no management UI, no policies.
    "$RABBITMQCTL" -q set_user_tags "$user" >/dev/null
    "$RABBITMQCTL" -q set_permissions -p "$VHOST" -- "$user" "${perms[0]}" "${perms[1]}" "${perms[2]}" >/dev/null
    echo "user $user ($role) on vhost $VHOST: configure ${perms[0]}  write ${perms[1]}  read ${perms[2]}"
    [ -z "$generated" ] || echo "password (shown once): $password"
    ;;
delete)
    [ $# -eq 2 ] || usage
    "$RABBITMQCTL" -q delete_user -- "$2" >/dev/null
    echo "user $2 deleted"
    ;;
show)
    [ $# -eq 2 ] || usage
    "$HOLDFAST" amqp-permissions "$2"
    ;;
*)
    usage
    ;;
esac
