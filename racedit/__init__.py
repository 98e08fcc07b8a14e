"""racedit — Race-DiT: a diffusion transformer whose FFN is a Mixture of Experts routed by
Expert Race (a top-K over all token-expert pairs of a batch). The work is done by a C11
core (CPU, BLAS sgemm from SciPy) and CUDA kernels; Python orchestrates.
"""
import os as _os
import sys as _sys

# SciPy's OpenBLAS picks its kernels by CPU model. On AVX-512 CPUs it does not recognise
# (AMD Zen 5, for one) it falls back to its AVX2 ("Haswell") kernels: half the sgemm rate.
# When the CPU has the AVX-512 subsets that OpenBLAS's SkylakeX kernels use, the user set no
# OPENBLAS_CORETYPE, and SciPy's BLAS is not loaded yet (racedit._C loads it below), ask for
# those kernels. RACEDIT_OPENBLAS_CORETYPE=0 leaves OpenBLAS's own choice alone.
_AVX512_SUBSETS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def _choose_openblas_coretype():
    if _os.environ.get("RACEDIT_OPENBLAS_CORETYPE", "1") in ("0", ""):
        return None
    if "OPENBLAS_CORETYPE" in _os.environ or "scipy.linalg" in _sys.modules:
        return None
    if not _sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    if _AVX512_SUBSETS <= set(line.split(":", 1)[1].split()):
                        _os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
                        return "SkylakeX"
                    return None
    except OSError:
        pass
    return None


_OPENBLAS_CORETYPE_SET = _choose_openblas_coretype()

def _import_core():
    """racedit._C, checked against racedit/_build_info.py (both are written by one build;
    a pair from two builds would make build_info() describe another extension)."""
    try:
        from . import _C
    except ImportError as e:
        here = _os.path.dirname(_os.path.abspath(__file__))
        raise ImportError(
            f"racedit: the compiled core racedit._C could not be loaded from {here} ({e}). "
            "If this is a source checkout, build it for this interpreter: `pip install .` "
            f"(or `pip install -e .`) in {_os.path.dirname(here)}; Python finds the racedit/ "
            "folder of the current directory before an installed racedit.") from e
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        return _C
    built, loaded = BUILD_INFO.get("build_id"), _C.build_info().get("build_id")
    if built != loaded:
        raise ImportError(
            f"racedit: {_C.__file__} (build {loaded}) and racedit/_build_info.py (build "
            f"{built}) come from different builds; reinstall racedit (`pip install .`)")
    return _C


_C = _import_core()

from ._version import __version__  # noqa: E402,F401


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
    info["openblas_coretype"] = _os.environ.get("OPENBLAS_CORETYPE")
    info["openblas_coretype_set_by_racedit"] = _OPENBLAS_CORETYPE_SET is not None
    return info


def cuda_available():
    """True when the CUDA kernels were compiled and a CUDA device is usable."""
    return bool(_C.build_info()["cuda"]) and _C.cuda_device_count() > 0


from . import configs, ops, ref  # noqa: E402
from . import metrics, shapes_metric, vae  # noqa: E402,F401  (torch only when called)
from .model import DeviceArray, RaceDiT  # noqa: E402,F401
from .moe import MoE  # noqa: E402,F401
from .train import TrainConfig, train  # noqa: E402,F401
from .sample import sample  # noqa: E402,F401  (the function; the module stays racedit.sample in sys.modules)
from .ablate import ablate  # noqa: E402,F401
