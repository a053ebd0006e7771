"""mergesearch: search mergekit recipes with Optuna over local or Ray workers, score them on cheap proxy evals.

Packages, top to bottom; a package imports only those below it (tests/test_layout.py enforces it,
and that no two modules import each other round a circle):

    search.commands   the command line: cli.py and one module per command, demo.py
    search.run        one run: the ask/tell driver, set-up, trial loop, baselines, held-out
    search.results    what a run hands back: winner, verdict, export, summary, report, card
    search.workers    the workers that build and score candidates, and their pool
    search.spec       the run spec, parsed and checked
    search.study      what Optuna sees: storage, samplers, pruners; the run's records
    search.engine, spaces, objectives
                      the merge engine (recipe -> tensors), the search spaces (trial -> recipe)
                      and the proxy evals (model -> score); spaces and objectives import only
                      search.engine, and the engine nothing else of ours

One candidate's path: search/run/driver.py asks a trial -> spaces/ suggests a recipe ->
search/workers/worker.py materializes it with search/engine/ and scores it with objectives/
-> search/run/trial_loop.py tells the study and writes trials.jsonl.
"""
