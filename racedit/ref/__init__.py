"""racedit.ref — pure NumPy (float64) twins of every op, the reference the tests compare
the C and CUDA kernels against; each twin is itself checked by finite differences."""
from .route import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .dit import *  # noqa: F401,F403
