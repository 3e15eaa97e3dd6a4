"""The Ray job, one job per module:

- :mod:`rlctl.job.entry`: ``train`` / ``evaluate`` (``rlctl train`` / ``rlctl eval``), error reporting;
- :mod:`rlctl.job.cluster`: device, ``ray.init`` and its watchdog, placement group, building the actors;
- :mod:`rlctl.job.actors`: what runs inside the actors (a trainer rank, a generator engine);
- :mod:`rlctl.job.groups`: the driver-side handles the loop and the colocation object call;
- :mod:`rlctl.job.transport`: how weights travel from the trainer to the engines (one small interface).

Importing this package imports neither torch nor ray (they load inside the functions).

Test: ``pytest tests/unit/test_train_e2e.py tests/unit/test_faults.py``.
"""

from rlctl.job.entry import evaluate, train
from rlctl.job.placement import PlacementTimeout

__all__ = ["train", "evaluate", "PlacementTimeout"]
