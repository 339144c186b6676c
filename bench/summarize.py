"""Markdown tables of fan-out results, Switchboard beside the peers of the same run, as ratios.

    .venv/bin/python bench/summarize.py r1            # bench/results/fanout-*-r1-*.json (+ -r1-d)
    .venv/bin/python bench/summarize.py r1 --base nats

Each cell: median (min-max) over the trials of that file; the ratio columns divide
Switchboard's median by the other target's median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
ORDER = ["switchboard", "nats", "nchan", "websockets", "ywebsocket"]


def load(tag: str) -> dict[str, dict[str, Any]]:
    """target -> {test -> {"trials", "summary"}}: every file of the tag (and tag-d) merged, so
    interleaved rounds (bench/run_all.sh, one trial per file) count as one run."""
    from fanout import summarize as summarize_trials

    out: dict[str, dict[str, Any]] = {}
    for suffix in (tag, f"{tag}-d"):
        for path in sorted(RESULTS.glob(f"fanout-*-{suffix}-2*.json")):
            data = json.loads(path.read_text())
            name = data["target"]
            tests = out.setdefault(name, {"_files": []})
            tests["_files"].append(path.name)
            for test, body in data["tests"].items():
                merged = tests.setdefault(test, {"trials": [], "errors": []})
                merged["trials"] += body["trials"]
                merged["errors"] += body["errors"]
    for tests in out.values():
        for test, body in tests.items():
            if test != "_files":
                body["summary"] = summarize_trials(test, body["trials"])
    return out


def cell(summary: dict[str, Any], label: str, scale: float = 1.0, digits: int = 0) -> str:
    v = summary.get(label)
    if not v:
        return "–"

    def f(x: float) -> str:
        x /= scale
        return f"{x:,.{digits}f}"

    if v["min"] == v["max"]:
        return f(v["median"])
    return f"{f(v['median'])} ({f(v['min'])}–{f(v['max'])})"


def median(summary: dict[str, Any], label: str) -> float | None:
    v = summary.get(label)
    return v["median"] if v else None


def summaries(results: dict[str, dict[str, Any]], target: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for test, body in results.get(target, {}).items():
        if test != "_files":
            merged.update(body["summary"])
    return merged


def latency_extra(results: dict[str, dict[str, Any]], target: str) -> str:
    """Peak-phase p99 of A (median over trials), for the notes."""
    trials = results.get(target, {}).get("A", {}).get("trials", [])
    p99 = [t["peak"].get("p99_ms") for t in trials if t["peak"].get("p99_ms") is not None]
    return f"{statistics.median(p99):.0f}" if p99 else "–"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tag")
    args = p.parse_args()
    results = load(args.tag)
    names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
    rows = [
        ("A peak deliveries/s", "A peak deliveries/s", 1, 0),
        ("A server / load CPU %", None, 1, 0),
        ("A @p99≤100ms", "A @p99<=100ms deliveries/s", 1, 0),
        ("B p50 / p99 / max ms", None, 1, 1),
        ("C deliveries/s", "C deliveries/s", 1, 0),
        ("C server / load CPU %", None, 1, 0),
        ("D KB/socket", "D KB/socket", 1, 1),
        ("D sockets/s", "D sockets/s", 1, 0),
    ]
    print("| target | " + " | ".join(r[0] for r in rows) + " | A peak-phase p99 ms |")
    print("|---" * (len(rows) + 2) + "|")
    for name in names:
        s = summaries(results, name)
        cells = []
        for title, label, scale, digits in rows:
            if title.startswith("A server"):
                cells.append(f"{cell(s, 'A server CPU %')} / {cell(s, 'A load CPU %')}")
            elif title.startswith("C server"):
                cells.append(f"{cell(s, 'C server CPU %')} / {cell(s, 'C load CPU %')}")
            elif title.startswith("B "):
                cells.append(" / ".join(cell(s, f"B {k} ms", 1, 1) for k in ("p50", "p99", "max")))
            else:
                assert label is not None
                cells.append(cell(s, label, scale, digits))
        print(f"| {name} | " + " | ".join(cells) + f" | {latency_extra(results, name)} |")
    sb = summaries(results, "switchboard")
    if not sb:
        return
    print()
    ratio_rows = [
        ("A peak", "A peak deliveries/s"),
        ("A @p99≤100ms", "A @p99<=100ms deliveries/s"),
        ("C", "C deliveries/s"),
        ("D sockets/s", "D sockets/s"),
        ("D KB/socket (lower is better)", "D KB/socket"),
    ]
    others = [n for n in names if n != "switchboard"]
    print("| Switchboard ÷ | " + " | ".join(others) + " |")
    print("|---" * (len(others) + 1) + "|")
    for title, label in ratio_rows:
        mine = median(sb, label)
        cells = []
        for other in others:
            theirs = median(summaries(results, other), label)
            cells.append(f"{mine / theirs:.2f}×" if mine and theirs else "–")
        print(f"| {title} | " + " | ".join(cells) + " |")
    print()
    for name in names:
        errors = [e for t, b in results[name].items() if t != "_files" for e in b["errors"]]
        print(f"- {name}: {len(results[name]['_files'])} files; failed trials: {errors or 'none'}")


if __name__ == "__main__":
    main()
