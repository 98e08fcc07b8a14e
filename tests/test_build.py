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


def _avx512_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"} <= set(flags.split())


def _coretype_in_child(**env):
    from _subproc import run_python

    code = "import racedit; print(racedit.build_info()['openblas_coretype'])"
    return run_python(["-c", code], env_extra=env, env_drop=("OPENBLAS_CORETYPE",),
                      capture_output=True, text=True, check=True).stdout.strip()


def test_openblas_coretype_choice():
    # a user's own setting always wins
    assert _coretype_in_child(OPENBLAS_CORETYPE="Haswell") == "Haswell"
    # opted out: racedit sets nothing
    assert _coretype_in_child(RACEDIT_OPENBLAS_CORETYPE="0") == "None"
    # unset: SkylakeX kernels exactly when the CPU has their AVX-512 subsets
    assert _coretype_in_child() == ("SkylakeX" if _avx512_cpu() else "None")


def test_source_distribution_lists_every_source():
    """MANIFEST.in's recursive-include rules cover every C / CUDA source and header under
    csrc/ and cuda/ (a header left out builds here and fails from the sdist)."""
    import fnmatch
    import os

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    manifest = os.path.join(root, "MANIFEST.in")
    if not os.path.isfile(manifest):
        import pytest

        pytest.skip("not a source checkout (no MANIFEST.in)")
    rules = []
    for line in open(manifest):
        words = line.split()
        if len(words) >= 3 and words[0] == "recursive-include":
            rules.append((words[1], words[2:]))
    missing = []
    for top in ("csrc", "cuda"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            rel_dir = os.path.relpath(dirpath, root)
            for f in files:
                if not f.endswith((".c", ".h", ".cu", ".cuh")):
                    continue
                covered = any((rel_dir == d or rel_dir.startswith(d + os.sep)) and
                              any(fnmatch.fnmatch(f, p) for p in pats) for d, pats in rules)
                if not covered:
                    missing.append(os.path.join(rel_dir, f))
    assert not missing, f"MANIFEST.in does not ship {missing}"
