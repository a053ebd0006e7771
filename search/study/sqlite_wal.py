"""SQLite in write-ahead-log mode with normal syncing: a commit without an fsync.

Optuna commits every write on its own (a trial's creation, each parameter, each
attribute, its end): about a dozen commits per trial. In SQLite's default mode each
commit syncs the database and its journal to disk, some 8 ms here, which made the
commits most of the driver's time per trial. In WAL mode with `synchronous=NORMAL` a
commit appends to the log without syncing (the log is synced at checkpoints): a killed
driver loses no committed write, so --resume finds every trial it told; only a power
loss or an OS crash may undo the last commits, and never corrupts the file
(https://www.sqlite.org/wal.html). The database must be on a local disk, as SQLite's
locking already requires; while the study is open, study.db-wal and study.db-shm sit
beside it.
"""

from __future__ import annotations

import optuna


def _on_connect(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def use_wal(storage: optuna.storages.RDBStorage) -> optuna.storages.RDBStorage:
    """Every connection of a SQLite `storage` in WAL mode with normal syncing; other databases unchanged."""
    import sqlalchemy

    engine = storage.engine
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return storage
    sqlalchemy.event.listen(engine, "connect", _on_connect)
    engine.dispose()  # connections opened before (tables created, version checked) are made again, with it
    return storage
