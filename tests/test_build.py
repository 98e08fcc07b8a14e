"""The package imports, reports what it was built with, and has a working BLAS."""

import racedit


def test_build_info_keys():
    info = racedit.build_info()
    for key in ("openmp", "blas", "cuda"):
        assert key in info
    assert info["sgemm_registered"] is True
    assert "sgemm" in info["blas"]


def test_cuda_available_is_bool():
    assert racedit.cuda_available() in (True, False)
