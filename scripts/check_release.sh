#!/usr/bin/env bash
# Release checks that are not pytest tests (CI runs this before the suite):
#   1. the API reference builds from the docstrings with no pdoc warning;
#   2. the Prometheus alert rules pass `promtool check rules`, and every
#      Grafana dashboard query parses as PromQL (promtool, as recording rules);
#   3. docker-compose.yml passes `docker compose config` (skipped, with a
#      message, when no compose CLI is installable here);
#   4. the wheel builds without a setuptools warning, installs into a fresh
#      virtualenv, and works from a directory outside the clone: import
#      (without psycopg2), `mcp-redis --help`, a local-mode lock and rate limit;
#      `pip install .` of the clone prints no setuptools warning either.
# It installs what it needs (apt: prometheus, docker-compose; pip: pdoc).
# Exit status: 0 when every check passed, 1 otherwise.
#   bash scripts/check_release.sh            (PYTHON=... picks the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
export PYTHON
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mcp_redis_release.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
failed=()

step() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAILED: %s\n' "$*" >&2; failed+=("$1"); }
apt_install() {  # apt_install PACKAGE...: quietly, once
  command -v apt-get >/dev/null || return 1
  if [[ -z "${_APT_UPDATED:-}" ]]; then apt-get update -qq >/dev/null 2>&1 || true; _APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}
# pip notices about this machine's package-index locations are not build warnings.
build_warnings() { grep -i 'warn' "$1" | grep -v "Location 'file://" || true; }

# -- 1. API reference -------------------------------------------------------------
step "API reference (pdoc, warnings are errors)"
"$PYTHON" -c "import pdoc" 2>/dev/null || "$PYTHON" -m pip install -q pdoc >/dev/null 2>&1
if bash scripts/api_docs.sh "$WORK/api"; then :; else fail "api-docs" "pdoc build (see above)"; fi

# -- 2. alert rules and dashboard queries ------------------------------------------
step "alert rules: promtool check rules"
command -v promtool >/dev/null || apt_install prometheus || true
if ! command -v promtool >/dev/null; then
  fail "promtool" "promtool not installable (apt-get install prometheus)"
else
  promtool check rules contrib/monitoring/mcp_redis.rules.yml || fail "rules" "promtool check rules"
  # Each dashboard query as a recording rule, so promtool parses it ($job -> .*).
  "$PYTHON" - "$WORK/dashboard.rules.yml" <<'EOF' || fail "dashboard" "dashboard queries could not be extracted"
import json, sys
d = json.load(open("contrib/monitoring/grafana-dashboard.json"))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
assert exprs, "no queries in the dashboard"
with open(sys.argv[1], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        out.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e.replace('$job', '.*'))}\n")
print(f"{len(exprs)} dashboard queries")
EOF
  [[ -s "$WORK/dashboard.rules.yml" ]] && { promtool check rules "$WORK/dashboard.rules.yml" || fail "dashboard" "a dashboard query is not valid PromQL"; }
fi

# -- 3. docker-compose.yml ---------------------------------------------------------
step "docker-compose.yml: compose config"
compose=()
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null; then compose=(docker-compose)
else
  # Debian ships the v1 CLI (docker-compose); docker-compose-plugin is Docker's own repository.
  for pkg in docker-compose-plugin docker-compose; do
    if apt-cache policy "$pkg" 2>/dev/null | grep -q 'Candidate: [0-9]'; then apt_install "$pkg" && break; fi
  done
  if docker compose version >/dev/null 2>&1; then compose=(docker compose)
  elif command -v docker-compose >/dev/null; then compose=(docker-compose); fi
fi
if [[ ${#compose[@]} -eq 0 ]]; then
  echo "SKIPPED: no compose CLI installable here (apt-cache policy docker-compose-plugin docker-compose)"
else
  for profile in "" sentinel cluster; do
    args=(-f docker-compose.yml); [[ -n "$profile" ]] && args+=(--profile "$profile")
    "${compose[@]}" "${args[@]}" config -q || fail "compose" "compose config ${profile:-default}"
  done
  # Host ports follow the variables.
  rendered="$(MCP_REDIS_REDIS_PORT=16379 MCP_REDIS_POSTGRES_PORT=15432 "${compose[@]}" -f docker-compose.yml config)"
  grep -Eq '(published: "?16379|127\.0\.0\.1:16379:6379)' <<<"$rendered" || fail "compose-ports" "MCP_REDIS_REDIS_PORT not applied"
  grep -Eq '(published: "?15432|127\.0\.0\.1:15432:5432)' <<<"$rendered" || fail "compose-ports" "MCP_REDIS_POSTGRES_PORT not applied"
  echo "compose config OK (${compose[*]})"
fi

# -- 4. wheel, fresh virtualenv, outside the clone -----------------------------------
step "wheel: build, install into a fresh venv, smoke test outside the clone"
if "$PYTHON" -m pip wheel --no-deps --no-cache-dir -w "$WORK/dist" "$ROOT" >"$WORK/wheel.log" 2>&1; then
  w="$(build_warnings "$WORK/wheel.log")"
  [[ -z "$w" ]] || { printf '%s\n' "$w"; fail "wheel-warnings" "the wheel build printed warnings"; }
else
  cat "$WORK/wheel.log"; fail "wheel" "pip wheel failed"
fi
wheel="$(ls "$WORK"/dist/mcp_redis-*.whl 2>/dev/null | head -1)"
if [[ -n "$wheel" ]]; then
  "$PYTHON" -m venv "$WORK/venv" && VPY="$WORK/venv/bin/python"
  if "$VPY" -m pip install -q "$wheel" >"$WORK/install.log" 2>&1; then
    mkdir -p "$WORK/elsewhere"
    (
      cd "$WORK/elsewhere" || exit 1
      env -u REDIS_URL -u DATABASE_URL MCP_REDIS_LOCK_DIR="$WORK/locks" "$VPY" - "$ROOT" <<'EOF'
import os, sys
root = os.path.realpath(sys.argv[1])
import mcp_redis
here = os.path.realpath(os.path.dirname(mcp_redis.__file__))
assert not here.startswith(root), f"imported from the clone: {here}"
assert "psycopg2" not in sys.modules, "import mcp_redis loaded psycopg2"
with mcp_redis.agent_lock("smoke-agent", blocking_timeout=5) as lock:
    assert lock.backend == "local", lock.backend
limiter = mcp_redis.RateLimiter("smoke", limits=[(2, 60)])
verdicts = [bool(limiter.hit("agent-1")) for _ in range(3)]
assert verdicts == [True, True, False], verdicts
print(f"smoke test OK: mcp_redis {mcp_redis.__version__} from {here}")
EOF
    ) || fail "smoke" "the installed wheel's smoke test"
    (cd "$WORK/elsewhere" && "$WORK/venv/bin/mcp-redis" --help >/dev/null) || fail "cli" "mcp-redis --help"
    # `pip install .` of the clone: the build must print no warning either.
    if "$VPY" -m pip install --no-deps --force-reinstall --no-cache-dir "$ROOT" >"$WORK/pip-install.log" 2>&1; then
      w="$(build_warnings "$WORK/pip-install.log")"
      [[ -z "$w" ]] || { printf '%s\n' "$w"; fail "install-warnings" "pip install . printed warnings"; }
    else
      cat "$WORK/pip-install.log"; fail "install" "pip install . failed"
    fi
  else
    cat "$WORK/install.log"; fail "wheel-install" "installing the wheel into a fresh venv"
  fi
fi

echo
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "check_release: FAILED (${failed[*]})" >&2
  exit 1
fi
echo "check_release: OK"
