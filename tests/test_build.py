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


def _source_root():
    import os

    import pytest

    root = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if not os.path.isfile(os.path.join(root, "setup.py")):
        pytest.skip("not a source checkout (no setup.py)")
    return root


def test_build_info_agrees_with_the_loaded_extension():
    info = racedit.build_info()
    core = racedit._C.build_info()
    assert info["build_id"] == core["build_id"] is not None
    assert info["cuda"] == core["cuda"] and info["openmp"] == core["openmp"]


def test_a_changed_build_configuration_rebuilds(tmp_path):
    """Building once without OpenMP and then with it (as installing without cuBLAS and then
    with it) compiles again instead of relinking stale objects; the same configuration twice
    reuses them; the extension, its build_info and the source folder's copy agree."""
    import os
    import shutil
    import subprocess
    import sys

    root = _source_root()
    src = tmp_path / "src"
    for d in ("csrc", "cuda", "racedit"):
        shutil.copytree(os.path.join(root, d), src / d,
                        ignore=shutil.ignore_patterns("*.so", "_build_info.py", "__pycache__"))
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(os.path.join(root, f), src / f)

    def build(**env):
        e = {k: v for k, v in os.environ.items() if not k.startswith("RACEDIT_")}
        e.update(RACEDIT_NO_CUDA="1", RACEDIT_DEBUG="1", **env)
        r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=src,
                           env=e, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    def core_info():
        code = ("import racedit, json; i = racedit.build_info(); "
                "print(json.dumps([i['openmp'], i['build_id'], racedit._C.build_info()['openmp']]))")
        r = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        import json

        return json.loads(r.stdout)

    build(RACEDIT_NO_OPENMP="1")
    omp, id1, core_omp = core_info()
    assert omp is False and core_omp is False
    out = build()
    assert "compiling every source again" in out
    omp, id2, core_omp = core_info()
    assert omp is True and core_omp is True and id2 != id1
    out = build()
    assert "compiling every source again" not in out
    assert core_info()[1] == id2
