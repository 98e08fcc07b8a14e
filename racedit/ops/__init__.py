"""racedit.ops — every C op as a thin function on NumPy arrays (for notebooks and tests).
Each function validates its arguments and raises ValueError/TypeError naming the argument,
the expected and the actual shape/dtype/value."""
from .route import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
