"""What a user asks a run to do: the run spec (YAML) parsed and checked before anything starts.

runspec.py is the spec's schema (`load_spec`), composed of the spaces' and objectives' own
specs; model_check.py checks the model folders it names (headers only, torch-free). Everything
here raises UserError with one line naming the field and how to fix it.
"""
