#!/bin/sh
# pg_ctl for the tests' throwaway PostgreSQL (pytest-postgresql calls it). initdb refuses to run as root, so as root
# (CI) it runs as the `postgres` user, who must also be able to read the password file pytest-postgresql writes.
bindir="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
if [ "$(id -u)" = 0 ]; then
  pwfile="$(printf '%s\n' "$*" | sed -n 's/.*--pwfile=\([^ ]*\).*/\1/p')"
  [ -n "$pwfile" ] && chown postgres "$pwfile"
  exec runuser -u postgres -- "$bindir/pg_ctl" "$@"
fi
exec "$bindir/pg_ctl" "$@"
