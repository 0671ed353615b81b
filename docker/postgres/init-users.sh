#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume
# (docker-entrypoint-initdb.d), as the owner POSTGRES_USER. Creates the
# group roles of migrations/V3__roles.sql (the migration keeps roles that
# exist) and one LOGIN user per service in its group, with the password from
# the service's Compose secret:
#
#   coordinator -> holdfast_coordinator    worker -> holdfast_worker
#   reconciler  -> holdfast_reconciler     admin  -> holdfast_admin
#
# The privileges themselves are granted by the migration, per table and column.
# Values reach SQL as psql variables quoted by format(%I, %L), never pasted in.
set -eu

for service in coordinator worker reconciler admin; do
    password_file="/run/secrets/${service}_db_password"
    if [ ! -s "$password_file" ]; then
        echo "init-users: $password_file is missing or empty" >&2
        exit 1
    fi
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -v group="holdfast_${service}" -v login="$service" \
        -v password="$(cat "$password_file")" <<'SQL'
SELECT format('CREATE ROLE %I NOLOGIN', :'group')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'group') \gexec
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L IN ROLE %I', :'login', :'password', :'group')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'login') \gexec
SQL
    echo "init-users: login role $service in group holdfast_${service}"
done
