"""Fixtures shared by the test modules, and the ``gpu`` marker: a test (or a "cuda" device
parameter, _numerics.on) marked ``gpu`` is skipped, with the reason, where racedit has no
usable CUDA device. The tests are grouped by area: ops/ (the kernels through their
bindings), layers/ (the MoE layer, the model, inference, the float64 twins), train/ (the
trainer and everything around it), cuda/ (what only a GPU has: masks bit-identical to the
CPU's, GEMM modes, TF32, bf16, determinism on the device); the root holds the build,
import and API-edge checks and the helpers (_numerics, _subproc, ...)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # the helpers, from any folder


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    import racedit

    if racedit.cuda_available():
        return
    why = ("CUDA not available: racedit built without CUDA" if not racedit.build_info()["cuda"]
           else "CUDA not available: no CUDA device")
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(params=[0, 1, 2], ids=["gemm_loop", "grouped", "side_streams"])
def gemm_mode(request):
    """Each expert-GEMM mode of the CUDA backend in turn (racedit.cuda.expert_gemm), the
    previous mode restored afterwards; grouped is skipped where cuBLAS lacks it. For GPU
    tests only (requesting it without a GPU raises RuntimeError)."""
    from racedit import cuda

    if request.param == 1 and not cuda.info()["grouped_gemm"]:
        pytest.skip("cublasGemmGroupedBatchedEx is not in the linked cuBLAS")
    prev = cuda.expert_gemm(request.param)
    yield request.param
    cuda.expert_gemm(prev)


def _pool_clean():
    from racedit import _C

    _C.check_pool(reset=True)
    yield
    pool = _C.check_pool()
    assert pool["errors"] == 0, pool["first_error"]


@pytest.fixture
def clean_check_pool():
    """Around a test on the checking backend (device="check"): its pool must have seen no
    misuse (a host pointer handed to an op, an overrun, a free of a foreign pointer)."""
    yield from _pool_clean()


@pytest.fixture(autouse=True)
def _check_device_pool(request):
    """clean_check_pool for every test parametrised with device="check"."""
    spec = getattr(request.node, "callspec", None)
    if spec is not None and spec.params.get("device") == "check":
        yield from _pool_clean()
    else:
        yield
