"""Fixtures shared by the test modules."""
import pytest


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


@pytest.fixture
def clean_check_pool():
    """Around a test on the checking backend (device="check"): its pool must have seen no
    misuse (a host pointer handed to an op, an overrun, a free of a foreign pointer)."""
    from racedit import _C

    _C.check_pool(reset=True)
    yield
    pool = _C.check_pool()
    assert pool["errors"] == 0, pool["first_error"]
