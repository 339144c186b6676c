#!/usr/bin/env bash
# Tests A-D against every peer and Switchboard in one run (what BENCHMARKS.md reports).
#   bash bench/run_all.sh [TAG]          # ~40 min; results in bench/results/*-TAG-*.json
# D runs on 1,000 channels x 10 sockets for every target: a book of 10,000 devices would make
# Switchboard's presence (every member listed in the first frame, device.online to every
# member) quadratic in the connect phase, which is not what D measures.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/../.venv/bin/python"
tag="${1:-all}"
for target in nats nchan websockets ywebsocket switchboard; do
    echo "== $target $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    "$py" "$here/fanout.py" --peer "$target" --tests ABC --tag "$tag"
    "$py" "$here/fanout.py" --peer "$target" --tests D --d-channels 1000 --tag "$tag-d"
done
echo "== done $(date -u +%FT%TZ)"
