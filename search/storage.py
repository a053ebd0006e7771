"""Where a study lives: SQLite in the run folder by default, or any Optuna storage.

Storage URLs can hold passwords (postgresql://user:secret@host/db): they are
masked wherever they are printed or written (`mask`), and never stored in the
run folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import optuna

from search.engine.errors import UserError

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<secret>[^@/\s]*)@")
_QUERY_SECRET = re.compile(r"(?i)((?:password|passwd|pwd|secret|token|key)=)[^&;\s]*")
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


def mask(url: str | None) -> str | None:
    """The URL with any password or token replaced by ***."""
    if url is None:
        return None
    url = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)
    return _QUERY_SECRET.sub(r"\1***", url)


def default_url(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'study.db').resolve()}"


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
                f"storage: {mask(url)!r} is neither a database URL (sqlite:///..., postgresql://...) "
                "nor a journal file (journal:PATH); fix it"
            )
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url)
    except UserError:
        raise
    except Exception as e:  # driver missing, host unreachable, ...
        reason = mask(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise UserError(f"storage: cannot open {mask(url)}: {reason}") from None


def has_study(storage: optuna.storages.BaseStorage, name: str) -> bool:
    return name in optuna.study.get_all_study_names(storage)
