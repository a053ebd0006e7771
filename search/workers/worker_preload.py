"""What the local workers' fork server imports once for all of them (search/workers/local_workers.py): the
libraries a worker's start would otherwise import on its own.

Imported with the garbage collector off: an import of this size allocates millions of objects and
the collector, run again and again over them, finds nothing to free (10-15% of the import time,
measured). The objects are then frozen (`gc.freeze`): the workers forked from here never collect
them, so the pages holding them stay shared instead of being copied on the collector's first visit.
"""

import gc

from search.engine.omp_wait import sleep_when_idle

sleep_when_idle()  # before torch loads OpenMP: every worker forked from here inherits it
gc.disable()
try:
    import torch  # noqa: F401
    import transformers.modeling_utils  # noqa: F401  (every model class's base, with its many imports)

    import objectives.lmeval  # noqa: F401  (lm-eval, datasets)
    import search.engine.materialize  # noqa: F401
    import search.workers.worker  # noqa: F401
finally:
    gc.enable()
gc.freeze()
