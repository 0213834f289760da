"""Opening a second record store on the same SQLite file in one process must not drop the first one's
locks. POSIX record locks belong to the process and inode, and closing *any* descriptor of the file
releases them all: a plain ``open()``/``close()`` of the database (to read its header) left the first
connection unlocked, so another process closing its own connection thought it was the last one,
checkpointed and deleted the WAL and its shared memory under the first ("disk I/O error")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modelbus.events.store import InMemoryEventStore
from modelbus.services.config import AppConfig
from modelbus.services.records import ModelRecordServiceSQL

# another process: opens the database, writes, closes (the last connection to close deletes the WAL)
OTHER = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA journal_mode=WAL'); "
         "c.execute('CREATE TABLE IF NOT EXISTS other (x)'); c.execute('INSERT INTO other VALUES (1)'); "
         "c.commit(); c.close()")


def test_a_second_store_on_the_file_keeps_the_first_ones_locks(app_config: AppConfig, tmp_path: Path) -> None:
    db = tmp_path / "records.db"
    log = InMemoryEventStore()
    first = ModelRecordServiceSQL.from_db_file(db, log, config=app_config)
    try:
        first.all_models()
        wal = Path(f"{db}-wal")
        assert wal.exists()
        second = ModelRecordServiceSQL.from_db_file(db, log, config=app_config)  # the same file, this process
        try:
            subprocess.run([sys.executable, "-c", OTHER, str(db)], check=True, timeout=60)
            # our connections are open: the other process was not the last one, the WAL stays
            assert wal.exists() and Path(f"{db}-shm").exists()
            assert first.all_models() == [] and second.all_models() == []
        finally:
            second.close()
    finally:
        first.close()
