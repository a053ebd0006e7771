"""mergesearch: search mergekit recipes with Optuna over local or Ray workers, score them on cheap proxy evals.

Packages and who may import whom (tests/test_layout.py enforces it):

- search.engine  the merge engine (recipe -> tensors); imports nothing else of ours.
- spaces         trial -> recipe; imports only search.engine.
- objectives     (model, tokenizer, fidelity) -> score; imports only search.engine.
- search         the loop that joins them: run spec, ask/tell driver, worker pool,
                 held-out re-scoring, samplers and pruners, records, export, and the
                 command line (cli.py and its *_command.py modules, demo.py); it may
                 import any of the above.

One candidate's path: search/driver.py asks a trial -> spaces/ suggests a recipe ->
search/worker.py materializes it with search/engine/ and scores it with objectives/
-> search/trial_loop.py tells the study and writes trials.jsonl.

Inside search/, by what a run does:
- set-up: runspec.py, model_check.py, run_setup.py, samplers.py, pruners.py, storage.py
- the loop: driver.py, trial_loop.py (with schedule.py, scored_recipes.py, stages.py,
  study_view.py, interrupts.py), worker_pool.py (with local_workers.py, ray_workers.py and
  worker_faults.py), worker.py, baselines.py, heldout.py,
  paired_pruner.py, staged_tpe.py, paired_stats.py, progress.py, records.py
- after it: verdict.py, export.py, publish.py and run_card.py (a model folder with its
  card), summary.py (tables), report.py with report_plots.py, importance.py and
  recipe_layers.py
- commands: cli.py, *_command.py, demo.py
"""
