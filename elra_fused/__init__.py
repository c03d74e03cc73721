"""elra_fused: a fast, memory-lean implementation of the ELRA optimizer.

ELRA (Exponential Learning Rate Adaption) is momentum-free gradient descent whose step
size adapts exponentially from the angle between consecutive gradients, with soft
restarts (retraces). See ``README.md`` and the paper in ``shared/paper``.
"""

from .control import ControlConfig
from .optimizer import ELRA

__all__ = ["ELRA", "ControlConfig"]
__version__ = "0.1.0"
