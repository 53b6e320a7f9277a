#!/usr/bin/env bash
# Makes sure PostgreSQL accepts connections at 127.0.0.1:5432 (starting the
# local cluster if it is down). Override with SLUICE_PG_HOST/SLUICE_PG_PORT.
set -euo pipefail
host=${SLUICE_PG_HOST:-127.0.0.1}
port=${SLUICE_PG_PORT:-5432}
if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  exit 0
fi
if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null; then
  echo "starting the local PostgreSQL cluster..." >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for _ in $(seq 1 30); do
  pg_isready -q -h "$host" -p "$port" && exit 0
  sleep 1
done
echo "PostgreSQL is not reachable at $host:$port" >&2
exit 1
