#!/usr/bin/env bash
# Make the secrets docker/compose.yml mounts: one random password per
# database user, the database URL of each service, and the broker URL.
# Existing files are kept, so running it again changes nothing; delete a
# file to make it anew (a database password only takes effect on a fresh
# postgres volume, or after ALTER ROLE ... PASSWORD).
#
#   scripts/compose-secrets.sh [DIR]     (default: docker/secrets)
#
# The directory is private to you (0700). The files are readable by others
# (0644) because Compose bind-mounts them as they are and the containers run
# as their own users (Holdfast as uid 65532): keep the directory private.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir="${1:-docker/secrets}"
mkdir -p "$dir"
chmod 0700 "$dir"

random() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

put() { # name content
    local file="$dir/$1"
    if [ -s "$file" ]; then
        echo "kept    $file"
        return
    fi
    (umask 022; printf '%s\n' "$2" >"$file")
    echo "created $file"
}

value() { tr -d '\n' <"$dir/$1"; }

put postgres_password "$(random)"
put migrate_database_url "postgres://holdfast:$(value postgres_password)@postgres:5432/holdfast"
for service in coordinator worker reconciler admin; do
    put "${service}_db_password" "$(random)"
    put "${service}_database_url" \
        "postgres://${service}:$(value "${service}_db_password")@postgres:5432/holdfast"
done
put amqp_url "amqp://guest:guest@rabbitmq:5672/%2f"
