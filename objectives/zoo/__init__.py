"""The toy model zoo: a small Llama base and specialists on synthetic skills, built on CPU in minutes.

`mergesearch zoo DIR` (see command.py) builds it; build.py says what goes where.
"""
