"""The per-user inbox: entries, the group-commit writer and the store queries (migration 0004)."""
