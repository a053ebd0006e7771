"""The workers that build and score candidates, and the pool that keeps them busy.

Start at worker.py (`Worker`: keeps the source models resident, materializes a recipe with
search.engine and scores it with objectives), then worker_pool.py (`WorkerPool`: one worker per
slot, replaced when it dies, timed). Where they run: local_workers.py (processes forked from a
preloaded fork server, worker_preload.py) or ray_workers.py (Ray actors, placed by
placement.py); worker_faults.py names what can go wrong with a call.
"""
