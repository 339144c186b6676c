"""README.md lists every setting with its current default (the newcomer's page must stay true)."""

from __future__ import annotations

import re
from pathlib import Path

from scripts.settings_table import table
from shared.config import setting_fields

README = Path(__file__).resolve().parent.parent / "README.md"


def _rows(markdown: str) -> dict[str, str]:
    """``{ENV_NAME: default cell}`` of every settings-table row in ``markdown``."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^\| `([A-Z0-9_]+)` \|([^|]*)\|", markdown, re.M)}


def test_every_setting_is_in_the_readme_with_its_default() -> None:
    documented = _rows(README.read_text(encoding="utf-8"))
    expected = _rows(table())
    assert len(expected) == len(setting_fields())
    missing = sorted(set(expected) - set(documented))
    assert not missing, f"add to README.md (scripts/settings_table.py prints the table): {missing}"
    stale = {env: (documented[env], default) for env, default in expected.items() if documented[env] != default}
    assert not stale, f"README.md defaults differ from shared/config.py (readme, code): {stale}"


def test_readme_names_the_two_commands_and_the_services() -> None:
    text = README.read_text(encoding="utf-8")
    for needle in ("make run", "make test", "postgresql://postgres@127.0.0.1:5432/test", "redis://127.0.0.1:6379/0", "BENCHMARKS.md"):
        assert needle in text
