"""The store: one small ``Database`` interface, two implementations (SQLite, PostgreSQL).

Repositories write SQL once, with PostgreSQL-style ``$1`` placeholders and portable types
(TEXT, BIGINT, INTEGER, bytes; times as BIGINT unix milliseconds; JSON as TEXT; booleans as
nullable timestamps or 0/1 INTEGER). The SQLite backend rewrites ``$n`` to ``?n``; values are
always bound, never formatted into SQL. ``db.dialect`` lets the rare query that differs
(``FOR UPDATE SKIP LOCKED``) pick its variant.
"""

from shared.store.base import Database, Row, open_database

__all__ = ["Database", "Row", "open_database"]
