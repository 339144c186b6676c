"""Print the README's settings table (markdown) from ``shared.config.setting_fields()``.

Run ``.venv/bin/python scripts/settings_table.py`` and paste the output into README.md
("Settings"); tests/test_readme.py fails when a setting is missing there.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.config import setting_fields  # noqa: E402 - after the path fix above


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value == "":
        return "(empty)"
    return f"`{value}`"


def table() -> str:
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for f in setting_fields():
        rows.append(f"| `{f.metadata['env']}` | {_cell(_default(f.default))} | {_cell(f.metadata['doc'])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
