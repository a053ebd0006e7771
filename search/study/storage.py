"""Where a study lives: SQLite in the run folder by default, or any Optuna storage.

Storage URLs can hold passwords (postgresql://user:secret@host/db): they are
masked wherever they are printed or written (`mask`), and never stored in the
run folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna
from sqlalchemy.engine import URL, make_url

from search.engine.errors import UserError, short
from search.study.single_writer_storage import SingleWriterStorage
from search.study.sqlite_wal import use_wal

_SECRET_WORDS = "password|passwd|pwd|secret|token|key"
_SECRET_KEY = re.compile(f"(?i){_SECRET_WORDS}")
_QUERY_SECRET = re.compile(f"(?i)((?:{_SECRET_WORDS})=)[^&;\\s]*")
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


def _parse(url: str) -> URL | None:
    """`url` as SQLAlchemy reads it, or None when it is not a database URL."""
    try:
        parsed = make_url(url)
    except Exception:
        return None
    # An unescaped '@' in the password: SQLAlchemy splits at the first '@', and the rest of the
    # password lands in the host; everything before the last '@' is the user's secret.
    if parsed.host and "@" in parsed.host:
        secret, _, host = parsed.host.rpartition("@")
        parsed = parsed.set(password=f"{parsed.password or ''}@{secret}", host=host)
    return parsed


def mask(url: str | None) -> str | None:
    """The URL with any password or token replaced by ***, read by SQLAlchemy's own URL parser
    (so a password with '/', spaces or '@' is masked whole)."""
    if url is None:
        return None
    parsed = _parse(url)
    if parsed is None:  # not a database URL (a journal path, a typo): mask what looks like a secret
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest:  # user:password@ before the last '@'
            rest = "***@" + rest.rpartition("@")[2]
        return _QUERY_SECRET.sub(r"\1***", scheme + sep + rest)
    if parsed.password is None and not any(_SECRET_KEY.search(k) for k in parsed.query):
        return url  # nothing to hide: shown exactly as given
    return _QUERY_SECRET.sub(r"\1***", parsed.render_as_string(hide_password=True))


def _scrub(message: str, url: str) -> str:
    """An error message about `url` with the URL, and its password wherever it appears, masked."""
    message = message.replace(url, mask(url))
    parsed = _parse(url)
    password = parsed.password if parsed is not None else None
    # a password of a letter or two would turn every such letter of the message into ***
    return message.replace(password, "***") if password and len(password) > 2 else message


def _sqlite_folder(parsed: URL) -> Path | None:
    """The folder a sqlite URL's database file goes in; None for memory or a `uri=true` filename,
    which SQLite reads as a URI (file:...), not a path to make folders for."""
    database = parsed.database
    if not database or database == ":memory:" or parsed.query.get("uri") in ("true", "1"):
        return None
    return Path(database).expanduser().parent


def default_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


def load_rdb_code(url: str) -> None:
    """For a database URL: import what Optuna's RDB storage imports on first use (its ORM models, alembic)
    and configure SQLAlchemy's mappers, 0.3-0.5 s of CPU that opening the study would spend; the driver has
    it done while the workers start (search/run/driver.py)."""
    if "://" in url and not url.startswith("journal:"):
        import importlib

        import sqlalchemy.orm

        # what optuna/storages/_rdb/storage.py imports lazily, on first use
        for module in ("alembic.command", "alembic.config", "alembic.migration", "alembic.script",
                       "optuna.storages._rdb.models"):
            importlib.import_module(module)
        sqlalchemy.orm.configure_mappers()


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`: an RDB URL (sqlite, postgresql, mysql), or a journal file
    given as `journal:PATH` or a path ending in .log/.journal/.jsonl."""
    try:
        if url.startswith("journal:") or (("://" not in url) and url.endswith(JOURNAL_SUFFIXES)):
            path = Path(url.removeprefix("journal:").removeprefix("//")).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = optuna.storages.journal.JournalFileBackend(str(path))
            return optuna.storages.JournalStorage(backend)
        if "://" not in url:
            raise UserError(
                f"storage: {short(mask(url))} is neither a database URL (sqlite:///..., postgresql://...) "
                "nor a journal file (journal:PATH); fix it"
            )
        parsed = make_url(url)
        folder = _sqlite_folder(parsed) if parsed.get_backend_name() == "sqlite" else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        # one driver writes the study: reads from memory, SQLite commits without an fsync (each file says why)
        return SingleWriterStorage(use_wal(optuna.storages.RDBStorage(url)))
    except UserError:
        raise
    except Exception as e:  # a malformed URL, driver missing, host unreachable, ...
        reason = _scrub(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, url)
        raise UserError(f"storage: cannot open {mask(url)}: {reason}") from None


def has_study(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return name in optuna.study.get_all_study_names(storage)
