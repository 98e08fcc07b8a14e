"""racedit — Race-DiT: a diffusion transformer whose FFN is a Mixture of Experts routed by
Expert Race (a top-K over all token-expert pairs of a batch). The work is done by a C11
core (CPU, BLAS sgemm from SciPy) and CUDA kernels; Python orchestrates.
"""
from . import _C

__version__ = "0.1.0"


def build_info():
    """What the C core was built with and found: ``openmp``, ``blas``, ``cuda`` and more."""
    from ._build_info import BUILD_INFO

    info = dict(BUILD_INFO)
    info.update(_C.build_info())
    try:
        import scipy

        dep = scipy.__config__.CONFIG["Build Dependencies"]["blas"]
        blas = f"{dep.get('name', '?')} {dep.get('version', '')}".strip()
    except Exception:  # pragma: no cover - SciPy without a config table
        blas = "unknown"
    info["blas"] = f"scipy.linalg.cython_blas.sgemm ({blas})"
    return info


def cuda_available():
    """True when the CUDA kernels were compiled and a CUDA device is usable."""
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0


from . import configs, ops, ref  # noqa: E402
from .model import RaceDiT  # noqa: E402,F401
from .moe import MoE  # noqa: E402,F401
from .train import TrainConfig, train  # noqa: E402,F401
from .sample import sample  # noqa: E402,F401  (the function; the module stays racedit.sample in sys.modules)
from .ablate import ablate  # noqa: E402,F401
