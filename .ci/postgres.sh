# Sourced by .ci/run: a throwaway PostgreSQL server on 127.0.0.1 for the
# storage tests (tests/test_workers.py reads AUTOTUNE_TEST_POSTGRES_URL).
# Installs Debian's postgresql package when it is missing, runs the server as
# an unprivileged user when CI runs as root, and stops it on exit.

pg_start() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$bin" ] || [ ! -x "$bin/pg_ctl" ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    PG_DIR=$(mktemp -d /tmp/autotune-pg.XXXXXX)
    local as=()
    if [ "$(id -u)" = 0 ]; then  # initdb refuses root
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres "$PG_DIR"
        as=(runuser -u postgres --)
    fi
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${as[@]}" "$bin/initdb" -D "$PG_DIR/data" -U autotune --auth=trust >"$PG_DIR/initdb.log" 2>&1
    "${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
        -o "-h 127.0.0.1 -p $port -k $PG_DIR -c max_connections=200" start >/dev/null
    PG_STOP=("${as[@]}" "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop)
    "${as[@]}" "$bin/createdb" -h 127.0.0.1 -p "$port" -U autotune autotune
    export AUTOTUNE_TEST_POSTGRES_URL="postgresql://autotune@127.0.0.1:$port/autotune"
    echo "$("$bin/pg_ctl" --version), 127.0.0.1:$port"
}

pg_stop() {
    if [ -n "${PG_DIR:-}" ]; then
        "${PG_STOP[@]}" >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}
