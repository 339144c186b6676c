#!/usr/bin/env bash
# Test E (Switchboard only), performance.md: what BENCHMARKS.md reports.
#   bash bench/run_e.sh [TAG]     # ~45 min
# 1. A and C peaks, 1 worker vs 2 workers, both with Redis (a private redis-server per trial),
#    interleaved per round. 1 worker: server on core 0, load on core 1 (as A-D). 2 workers: the
#    server on both cores, the load unpinned (it shares the cores: there are only two).
# 2. 100,000 idle sockets over 8 workers (20,000 open files per process), held 10 minutes with
#    the server's heartbeats (HEARTBEAT_S 30), sampled every 30 s.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$here/../.venv/bin/python"
tag="${1:-e}"
common=(--peer switchboard --runs 1 --a-steps '' --sb-redis 16379)
for r in 1 2 3; do
    echo "== round $r $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
    flock /tmp/switchboard-bench.lock "$py" "$here/fanout.py" "${common[@]}" --tests AC --tag "$tag-w1"
    "$py" "$here/fanout.py" "${common[@]}" --tests AC --sb-env WORKERS=2 --server-cpus 0,1 \
        --load-cpus '' --tag "$tag-w2"
done
echo "== 100k $(date -u +%FT%TZ) load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$py" "$here/fanout.py" --peer switchboard --tests E --runs "${E_RUNS:-3}" --sb-redis 16379 \
    --sb-env WORKERS=8 --server-cpus 0,1 --load-cpus '' --tag "$tag-100k"
echo "== done $(date -u +%FT%TZ)"
