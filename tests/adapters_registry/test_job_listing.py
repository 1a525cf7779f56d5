"""Listing a tenant's fine-tuning jobs: one page at a time, filtered by metadata in the
database (SQLite and PostgreSQL), never every job read and filtered in Python."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import event

from tests.adapters_registry.test_fine_tuning import create, reg, upload

__all__ = ["reg"]  # the fixture, shared with test_fine_tuning


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_jobs_are_listed_a_page_at_a_time_filtered_by_metadata_in_the_database(reg) -> None:
    file_id = upload(reg)
    made = []
    for i in range(6):  # the last one without metadata
        metadata = {"team": "a" if i % 2 else "b", "n": str(i)} if i < 5 else None
        made.append(create(reg, training_file=file_id, metadata=metadata))
        if i < 4:  # finished: the limit on waiting jobs lets the next in
            reg.jobs.cancel("acme", made[-1].id)
    page, more = reg.jobs.list("acme", limit=2)
    assert [j.id for j in page] == [made[5].id, made[4].id] and more
    page, more = reg.jobs.list("acme", limit=2, metadata={"team": "a"})
    assert [j.id for j in page] == [made[3].id, made[1].id] and not more
    page, more = reg.jobs.list("acme", limit=1, metadata={"team": "b"}, after=made[4].id)
    assert [j.id for j in page] == [made[2].id] and more
    assert reg.jobs.list("acme", metadata={"team": "a", "n": "3"})[0][0].id == made[3].id
    assert reg.jobs.list("acme", metadata={"team": "a", "n": "2"}) == ([], False)
    assert reg.jobs.list("acme", metadata={"n": "3'; DROP TABLE x; --"}) == ([], False)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    event.listen(reg.db, "before_cursor_execute", seen)
    try:
        reg.jobs.list("acme", limit=1, metadata={"team": "a"})
    finally:
        event.remove(reg.db, "before_cursor_execute", seen)
    (query,) = [q for q in statements if "FROM fine_tuning_jobs" in q]
    where = re.split(r"\sWHERE\s", query.upper(), maxsplit=1)[1]
    assert "LIMIT" in where and "EXTRA" in where, "one page, filtered, read from the database"
