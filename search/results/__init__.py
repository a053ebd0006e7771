"""What a run hands back, read from its folder alone: the winner, verdict, YAML, report and model card.

Start at winner.py (the one place the winner is picked), then verdict.py (winner against the
best baseline), export.py (trials as mergekit YAML), summary.py (the end-of-run and `show`
tables), report.py with report_plots.py, importance.py and recipe_layers.py (plots and
report.html), publish.py with run_card.py (the winner built into a model folder with its card).
"""
