"""The command line: `mergesearch run | show | report | export | merge | demo`.

Start at cli.py: COMMANDS maps each command to its module here (`merge` lives in the engine,
search/engine/merge_command.py), imported only when used so a command pays for no library it
does not need. Each *_command.py parses its options and calls one function below it: `run` ->
search.run.driver.run, `show` -> search.results.summary, `report` -> search.results.report,
`export` -> search.results.export and publish. demo.py is the main job on the built-in toy zoo.
"""
