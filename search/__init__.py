"""mergesearch: search mergekit recipes with Optuna and Ray, score them on cheap proxy evals.

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
"""
