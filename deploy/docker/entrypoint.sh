#!/bin/sh
# Container entrypoint of the conceptguard image.
#
# 1. Empties PROMETHEUS_MULTIPROC_DIR: prometheus_client sums every *.db file in it, so files
#    left by the processes of a previous run would be added to this run's /metrics.
# 2. `serve` (the default CMD), no arguments or only options: runs `conceptguard serve` with
#    the bank, host, port, workers and log level taken from the environment; extra arguments
#    are passed on (the last one wins). Anything else is executed as given, e.g.
#    `docker run IMAGE conceptguard build-bank --config ... --out ...` or `... bash`.
set -eu

if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    mkdir -p "${PROMETHEUS_MULTIPROC_DIR}"
    # only prometheus_client's files (counter_<pid>.db, gauge_livesum_<pid>.db, ...), never a
    # whole tree, whatever the variable points at
    find "${PROMETHEUS_MULTIPROC_DIR}" -mindepth 1 -maxdepth 1 -type f -name '*.db' -delete
fi

if [ "$#" -eq 0 ]; then
    set -- serve
elif [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi

if [ "$1" = "serve" ]; then
    shift
    exec conceptguard serve \
        --bank "${CONCEPTGUARD_BANK:-/app/banks/demo}" \
        --host "${CONCEPTGUARD_HOST:-0.0.0.0}" \
        --port "${CONCEPTGUARD_HTTP_PORT:-8000}" \
        --workers "${CONCEPTGUARD_WORKERS:-1}" \
        --log-level "${CONCEPTGUARD_LOG_LEVEL:-info}" \
        "$@"
fi

exec "$@"
