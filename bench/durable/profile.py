"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): where the server's time goes.

    .venv/bin/python bench/durable/profile.py bench/results/durable-profile-....txt [--top 30]

Prints the share of samples per function *including* its callees (inclusive) and per leaf
function (self), with the file shortened to the package path.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:]*):?(?P<line>\d*)\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    f = m["file"]
    for marker in ("site-packages/", "/wt-durbench/", "/lib/python3"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{m['func']} ({f})"


def summarize(path: Path, top: int = 30) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        # the first frame is "process ... " / thread name in py-spy raw output
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            leaf[frames[-1]] += n
    out = [f"{path.name}: {total} samples"]
    out.append("\ninclusive (function and what it calls):")
    for f, n in inclusive.most_common(top):
        out.append(f"  {100 * n / total:5.1f} %  {f}")
    out.append("\nself (leaf functions):")
    for f, n in leaf.most_common(top):
        out.append(f"  {100 * n / total:5.1f} %  {f}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    print(summarize(a.path, a.top))


if __name__ == "__main__":
    main()
