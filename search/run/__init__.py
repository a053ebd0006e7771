"""One run from spec to winners: the ask/tell driver and its steps.

Start at driver.py (`run`): its docstring lists the steps in order, each with its module:
run_setup.py (inputs checked, the study opened), baselines.py (hand-written merges scored),
trial_loop.py (ask, dispatch to a free worker, tell; with schedule.py, stages.py,
scored_recipes.py and interrupts.py), heldout.py (the top trials re-scored on a split the
search never saw), progress.py (the live progress panel).
"""
