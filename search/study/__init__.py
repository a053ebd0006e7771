"""What Optuna sees, and what a run records: the study's storage, samplers, pruners and records.

storage.py opens the study's storage (SQLite with WAL, sqlite_wal.py; one writer,
single_writer_storage.py); samplers.py and pruners.py build them by name (staged_tpe.py,
tpe_history.py and study_view.py shape what TPE reads; paired_pruner.py with paired_stats.py
stops a trial worse than the best on the same examples); records.py reads and writes the run
folder's trials.jsonl and run.json; trial_counts.py keeps the study's counts as trials are told.
"""
