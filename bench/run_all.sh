#!/usr/bin/env bash
# Tests A-D against Switchboard and every peer in one run (what BENCHMARKS.md reports).
#   bash bench/run_all.sh [TAG] [ROUNDS]    # ~45 min for 3 rounds; bench/results/*-TAG-*.json
#   TARGETS="switchboard nats" bash bench/run_all.sh TAG   # a subset
# Interleaved: each round runs one trial of every target, in a rotated order, so that the load of
# other users of this shared machine falls on all targets alike; bench/summarize.py TAG merges
# the rounds (median and min-max over them).
# D runs on 1,000 channels x 10 sockets for every target: a book of 10,000 devices would make
# Switchboard's presence (every member listed in the first frame, device.online to every
# member) quadratic in the connect phase, which is not what D measures.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/../.venv/bin/python"
tag="${1:-all}"
rounds="${2:-3}"
read -r -a targets <<< "${TARGETS:-switchboard nats nchan websockets ywebsocket}"
for ((r = 0; r < rounds; r++)); do
    for ((i = 0; i < ${#targets[@]}; i++)); do
        target="${targets[$(((i + r) % ${#targets[@]}))]}"
        echo "== round $((r + 1)) $target $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
        "$py" "$here/fanout.py" --peer "$target" --tests ABC --runs 1 --tag "$tag"
        "$py" "$here/fanout.py" --peer "$target" --tests D --d-channels 1000 --runs 1 --tag "$tag-d"
    done
done
echo "== done $(date -u +%FT%TZ)"
