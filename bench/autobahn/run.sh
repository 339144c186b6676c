#!/usr/bin/env bash
# Autobahn|Testsuite fuzzing client against an echo endpoint on the relay's transport.
#
#   bench/autobahn/run.sh                 # every case but 12.* and 13.* (no compression)
#   CASES='["1.*","2.*"]' bench/autobahn/run.sh   # a subset
#
# Needs Python 2.7 (the PyPI package autobahntestsuite is Python 2 only); see
# /work/shared/notes/autobahn.md. Exits non-zero when a case fails that allowlist.json does not list.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${ABT_VENV:-/tmp/abt-venv}"
port="${PORT:-9001}"
py="$root/.venv/bin/python"

find_python27() {
    if PYENV_VERSION=2.7.18 python2.7 -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
        echo "PYENV_VERSION=2.7.18 python2.7"
    elif command -v python2.7 >/dev/null && python2.7 -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
        echo python2.7
    fi
}

if [[ ! -x "$venv/bin/wstest" ]]; then
    py27="$(find_python27)"
    if [[ -z "$py27" ]]; then
        echo "############################################################################" >&2
        echo "# AUTOBAHN NOT RUN: no Python 2.7 on this machine (autobahntestsuite needs it)." >&2
        echo "# Install it (pyenv install 2.7.18) or point ABT_VENV at a venv with wstest.  " >&2
        echo "############################################################################" >&2
        exit 3
    fi
    # virtualenv >= 20.22 cannot create Python 2 environments: bootstrap an older one for 2.7.
    boot="$(mktemp -d)"
    env $py27 -m pip install -q --disable-pip-version-check --target "$boot" 'virtualenv<20.22'
    env PYTHONPATH="$boot" $py27 -m virtualenv -q "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check autobahntestsuite==25.10.1
fi

cd "$here"
# Always a temporary copy: the checked-in fuzzingclient.json names port 9001 and all cases.
config="$(mktemp --suffix=.json)"
"$py" -c '
import json, sys
c = json.load(open("fuzzingclient.json"))
if sys.argv[1]:
    c["cases"] = json.loads(sys.argv[1])
c["servers"][0]["url"] = c["servers"][0]["url"].replace("127.0.0.1:9001", "127.0.0.1:" + sys.argv[2])
json.dump(c, open(sys.argv[3], "w"))
' "${CASES:-}" "$port" "$config"

rm -rf reports
PYTHONPATH="$root" "$py" echo_server.py --port "$port" > echo_server.log 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "listening on" echo_server.log && break
    kill -0 "$server" 2>/dev/null || { cat echo_server.log >&2; exit 1; }
    sleep 0.1
done

"$venv/bin/wstest" -m fuzzingclient -s "$config" > wstest.log 2>&1 || { tail -20 wstest.log >&2; exit 1; }
"$py" summarize.py reports/servers/index.json allowlist.json
