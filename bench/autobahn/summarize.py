"""Read Autobahn's ``index.json``: counts per behaviour, and every FAILED case not in the allow list.

    python3 summarize.py reports/servers/index.json allowlist.json

Exit 1 if a case FAILED (behaviour or close behaviour) without an allow-list entry, or if an
allow-list entry no longer fails (stale entries hide regressions of the reason they record).
"""

from __future__ import annotations

import json
import sys
from collections import Counter


def main(index_path: str, allowlist_path: str) -> int:
    with open(index_path) as f:
        index = json.load(f)
    with open(allowlist_path) as f:
        allowed: dict[str, str] = json.load(f)
    status = 0
    if not index or not any(index.values()):
        print("no case ran: was the echo server reachable? (see wstest.log)")
        return 1
    for agent, cases in sorted(index.items()):
        behaviour = Counter(c["behavior"] for c in cases.values())
        closing = Counter(c["behaviorClose"] for c in cases.values())
        print(f"{agent}: {len(cases)} cases")
        print("  behavior:       " + ", ".join(f"{k} {v}" for k, v in sorted(behaviour.items())))
        print("  close behavior: " + ", ".join(f"{k} {v}" for k, v in sorted(closing.items())))
        failed = sorted(
            (case for case, c in cases.items() if "FAILED" in (c["behavior"], c["behaviorClose"])),
            key=lambda s: tuple(int(p) for p in s.split(".")),
        )
        for case in failed:
            c = cases[case]
            if case in allowed:
                print(
                    f"  allowed   {case}: {c['behavior']}/{c['behaviorClose']} -- {allowed[case]}"
                )
            else:
                print(
                    f"  FAILED    {case}: {c['behavior']}/{c['behaviorClose']} (not in the allow list)"
                )
                status = 1
        for case in sorted(set(allowed) - set(failed)):
            if case in cases:
                print(
                    f"  stale     {case}: allowed but no longer fails; remove it from the allow list"
                )
                status = 1
        non_strict = sorted(case for case, c in cases.items() if c["behavior"] == "NON-STRICT")
        if non_strict:
            print("  non-strict: " + " ".join(non_strict))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
