#!/usr/bin/env bash
# Autobahn|Testsuite (the RFC 6455 conformance suite) against the demo
# server: the fuzzingclient runs every case but 12.* and 13.*
# (permessage-deflate, which actix does not implement) and this script fails
# on any case whose behavior or behaviorClose is not OK, NON-STRICT or
# INFORMATIONAL. It prints the counts by behaviour and the suite's wall time.
#
# The suite needs Python 2.7 (autobahntestsuite 25.10.1). The environment is
# made once and cached in $AUTOBAHN_ENV (default target/autobahn/env) from
# pyenv's CPython 2.7 with `virtualenv<20.22`, the last virtualenv that can
# still make a 2.7 environment. Where that is impossible the suite is
# SKIPPED, loudly, and the script exits 0.
#
# The server runs with examples/demo/autobahn.json: the suite's settings
# (16 MiB messages for the 9.* cases, and an inbound rate their bursts fit),
# not the defaults.
#
# Usage: .ci/autobahn.sh [path/to/demo_server]   (default: builds and uses
# target/debug/examples/demo_server)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=target/autobahn
AUTOBAHN_ENV=${AUTOBAHN_ENV:-$WORK/env}
SUITE_VERSION=25.10.1
CONFIG=examples/demo/autobahn.json
mkdir -p "$WORK"

skip() {
  echo "!! AUTOBAHN SKIPPED: $1"
  echo "!! (WebSocket conformance was not checked on this run)"
  exit 0
}

# ---- the Python 2.7 environment -------------------------------------------

find_python27() {
  local candidate
  for candidate in \
    "$(command -v python2.7 || true)" \
    "${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] \
      && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if [ ! -x "$AUTOBAHN_ENV/bin/wstest" ]; then
  echo "== making the Autobahn environment in $AUTOBAHN_ENV"
  PY27=$(find_python27) || skip "no Python 2.7 interpreter (python2.7, or pyenv's 2.7.x)"
  command -v python3 >/dev/null 2>&1 || skip "python3 is needed to run virtualenv"
  TOOLS=$WORK/virtualenv-tool
  rm -rf "$AUTOBAHN_ENV"
  if ! { python3 -m venv "$TOOLS" \
      && "$TOOLS/bin/pip" install -q 'virtualenv<20.22' \
      && "$TOOLS/bin/python" -m virtualenv -q -p "$PY27" "$AUTOBAHN_ENV" \
      && "$AUTOBAHN_ENV/bin/pip" install -q "autobahntestsuite==$SUITE_VERSION"; }; then
    rm -rf "$AUTOBAHN_ENV"
    skip "could not install autobahntestsuite $SUITE_VERSION into a Python 2.7 virtualenv"
  fi
fi
"$AUTOBAHN_ENV/bin/wstest" --autobahnversion 2>/dev/null | head -n 2 || true

# ---- the server ------------------------------------------------------------

SERVER=${1:-}
if [ -z "$SERVER" ]; then
  cargo build --example demo_server
  SERVER=target/debug/examples/demo_server
fi
LOG=$WORK/server.log
"$SERVER" --bind 127.0.0.1:0 --config "$CONFIG" >"$LOG" 2>&1 &
SERVER_PID=$!
# Only the process started here is stopped, by its id.
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT

PORT=
for _ in $(seq 1 300); do
  PORT=$(sed -n 's#.*open http://127\.0\.0\.1:\([0-9][0-9]*\)/.*#\1#p' "$LOG" | head -n 1)
  [ -n "$PORT" ] && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    cat "$LOG"
    echo "!! the demo server exited before listening"
    exit 1
  fi
  sleep 0.1
done
[ -n "$PORT" ] || { cat "$LOG"; echo "!! the demo server did not report its port"; exit 1; }
echo "== demo server on 127.0.0.1:$PORT with $CONFIG (the suite's settings)"

# ---- the suite -------------------------------------------------------------

rm -rf "$WORK/reports"
cat >"$WORK/spec.json" <<EOF
{
  "outdir": "./reports",
  "servers": [{"agent": "happynet", "url": "ws://127.0.0.1:$PORT/ws"}],
  "cases": ["*"],
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
EOF
WSTEST=$(realpath "$AUTOBAHN_ENV")/bin/wstest
START=$(date +%s)
(cd "$WORK" && "$WSTEST" -m fuzzingclient -s spec.json >wstest.log 2>&1) || {
  tail -n 30 "$WORK/wstest.log"
  echo "!! wstest failed"
  exit 1
}
ELAPSED=$(( $(date +%s) - START ))

# ---- the verdict -----------------------------------------------------------

python3 - "$WORK/reports/index.json" "$ELAPSED" <<'EOF'
import collections, json, sys

ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
path, elapsed = sys.argv[1], sys.argv[2]
with open(path) as f:
    cases = json.load(f)["happynet"]

def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))

behavior = collections.Counter(c["behavior"] for c in cases.values())
closing = collections.Counter(c["behaviorClose"] for c in cases.values())
def line(counts):
    return ", ".join("%s %d" % kv for kv in sorted(counts.items()))
print("== Autobahn|Testsuite: %d cases (12.* and 13.* excluded) in %s s" % (len(cases), elapsed))
print("   behavior:      " + line(behavior))
print("   behaviorClose: " + line(closing))
for case_id in sorted(cases, key=case_key):
    c = cases[case_id]
    if c["behavior"] != "OK" or c["behaviorClose"] != "OK":
        print("   %-8s behavior %s, close %s (code %s)" % (
            case_id, c["behavior"], c["behaviorClose"], c.get("remoteCloseCode")))
bad = [i for i, c in cases.items()
       if c["behavior"] not in ACCEPTED or c["behaviorClose"] not in ACCEPTED]
if bad:
    print("!! Autobahn: %d case(s) failed: %s" % (len(bad), " ".join(sorted(bad, key=case_key))))
    print("!! see target/autobahn/reports/index.html")
    sys.exit(1)
print("== Autobahn: every case OK, NON-STRICT or INFORMATIONAL")
EOF
