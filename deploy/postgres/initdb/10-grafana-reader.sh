#!/bin/sh
# Run once by the postgres image when it initialises an empty data directory (docker-entrypoint-initdb.d),
# as the database owner POSTGRES_USER, which the detector also connects as (it creates the tables by its
# migrations). Creates the role Grafana reads with: it may connect and SELECT, nothing else, including on
# the tables the owner creates later (default privileges).
# Environment: POSTGRES_USER, POSTGRES_DB, GRAFANA_DB_USER, GRAFANA_DB_PASSWORD (libpq's PG* for the rest).
set -eu
: "${GRAFANA_DB_USER:?}" "${GRAFANA_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v reader="$GRAFANA_DB_USER" -v reader_password="$GRAFANA_DB_PASSWORD" \
    -v owner="$POSTGRES_USER" -v database="$POSTGRES_DB" <<'SQL'
CREATE ROLE :"reader" LOGIN PASSWORD :'reader_password' NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
ALTER ROLE :"reader" SET default_transaction_read_only = on;
ALTER ROLE :"reader" SET statement_timeout = '30s';
GRANT CONNECT ON DATABASE :"database" TO :"reader";
GRANT USAGE ON SCHEMA public TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader";
SQL
