# shellcheck shell=bash
# Shared by scripts/serve.sh and scripts/test.sh: install and start what the
# broker needs locally, or use what the environment already names.
#
#   DATABASE_URL    use this PostgreSQL instead of a local one
#
# Functions print what they do to stderr and export what they found.

log() { printf '\033[1m[workbroker]\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        log "need root for: $* (install sudo or run as root)"; return 1; fi
}

apt_updated=0
# ensure_packages PACKAGE...: apt-get installs the Debian packages that are missing.
ensure_packages() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_rust() {
    if ! command -v cargo >/dev/null; then
        log "cargo not found: install the Rust toolchain (https://rustup.rs), then run this again"
        return 1
    fi
}

# pg_running HOST PORT
pg_running() { pg_isready -q -h "$1" -p "$2" 2>/dev/null; }

# start_local_postgres: start the Debian cluster(s) if none is answering on 127.0.0.1:5432.
start_local_postgres() {
    pg_running 127.0.0.1 5432 && return 0
    local version
    for version in $(ls /etc/postgresql 2>/dev/null); do
        log "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
            || as_root pg_ctlcluster "$version" main start || true
    done
    for _ in $(seq 1 50); do pg_running 127.0.0.1 5432 && return 0; sleep 0.2; done
    log "PostgreSQL did not come up on 127.0.0.1:5432"
    return 1
}

# ensure_postgres: export DATABASE_URL for a server on which we may create
# databases. Uses DATABASE_URL when set; otherwise installs and starts a local
# PostgreSQL and uses the postgres superuser over TCP if trust auth allows it,
# else a `workbroker` role (CREATEDB, password workbroker) created through the
# postgres OS account.
ensure_postgres() {
    if [ -n "${DATABASE_URL:-}" ]; then
        log "using DATABASE_URL from the environment"
        ensure_packages postgresql-client
        export DATABASE_URL
        return 0
    fi
    command -v pg_ctlcluster >/dev/null || ensure_packages postgresql
    ensure_packages postgresql-client
    start_local_postgres
    if psql "postgres://postgres@127.0.0.1:5432/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
        export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    else
        log "creating PostgreSQL role workbroker (CREATEDB) for local use"
        as_root su postgres -c "psql -q -v ON_ERROR_STOP=1 -d postgres" <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'workbroker') THEN
    CREATE ROLE workbroker LOGIN CREATEDB PASSWORD 'workbroker';
  END IF;
END $$;
SQL
        export DATABASE_URL="postgres://workbroker:workbroker@127.0.0.1:5432/postgres"
    fi
    log "using local PostgreSQL: ${DATABASE_URL}"
}

# database_url_for NAME: DATABASE_URL with its database replaced by NAME.
database_url_for() {
    python3 - "$DATABASE_URL" "$1" <<'PY'
import sys, urllib.parse as u
parts = u.urlsplit(sys.argv[1])
print(u.urlunsplit(parts._replace(path="/" + sys.argv[2])))
PY
}

# ensure_database NAME: create database NAME on DATABASE_URL's server if missing.
ensure_database() {
    local name="$1"
    if ! psql "$DATABASE_URL" -Atqc "select 1 from pg_database where datname = '$name'" | grep -q 1; then
        log "creating database $name"
        psql "$DATABASE_URL" -qc "create database \"$name\""
    fi
}
