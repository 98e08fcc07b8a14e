"""Data-parallel training (racedit.distributed): gradient accumulation on one process, the
same global batch for every layout of ranks x accumulations under mpirun (2 ranks on the
CPU), resume rules, and a failing rank ending the job. The MPI tests skip when mpi4py or
an MPI launcher is missing."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from racedit import distributed
from racedit.distributed import _PairwiseSum, _threshold_update, micro_layout
from racedit.train import train

from _subproc import python_env

TINY = dict(preset="tiny", steps=6, global_batch_size=8, final_samples=False, report=False,
            progress=False, threads=1)


def _mpiexec():
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    exe = shutil.which("mpiexec", path=path) or shutil.which("mpirun", path=path)
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return exe


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason="mpi4py or mpiexec not installed "
                                                       "(pip install '.[mpi]')")


def _tensors(run_root):
    (path,) = sorted(glob.glob(os.path.join(run_root, "*", "checkpoints", "*.safetensors")))[-1:]
    return load_file(path)


def _log(run_root):
    (path,) = glob.glob(os.path.join(run_root, "*", "log.jsonl"))
    return [json.loads(l) for l in open(path) if '"step"' in l and '"event"' not in l]


def _same(a, b):
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def _cli(tmp_path, name, *flags, ranks=1, timeout=300, script=None):
    """`python -m racedit train --preset tiny ...` (or a script) on ``ranks`` ranks."""
    args = (["-c", script] if script else
            ["-m", "racedit", "train", "--preset", "tiny", "--no-report", "--threads", "1",
             "--results-dir", str(tmp_path / name), *flags])
    cmd = [sys.executable, *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    env = python_env(drop=distributed._SIZE_VARS)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- one process ---------------------------------------------------------------------

def test_pairwise_sum_is_a_tree():
    rng = np.random.default_rng(0)
    g = [rng.standard_normal(1000).astype(np.float32) * 10.0 ** rng.integers(-3, 3)
         for _ in range(4)]
    acc = _PairwiseSum()
    for x in g:
        acc.push(x.copy())
    assert np.array_equal(acc.total(), (g[0] + g[1]) + (g[2] + g[3]))
    acc = _PairwiseSum()
    for x in g[:3]:
        acc.push(x.copy())
    assert np.array_equal(acc.total(), (g[0] + g[1]) + g[2])


def test_micro_layout_checks():
    assert micro_layout(8, 2, 2) == 2
    with pytest.raises(ValueError, match=r"global_batch_size .*8 .*not divisible .*3"):
        micro_layout(8, 1, 3)
    with pytest.raises(ValueError, match=r"grad_accum .*>= 1, got 0"):
        micro_layout(8, 1, 0)
    with pytest.raises(ValueError, match="not divisible"):
        train(**TINY, grad_accum=3, results_dir="unused")


def test_threshold_update_mean_of_micro_batches():
    tau0 = np.array([np.nan, 1.0, 2.0], np.float32)
    tb = [[0.5, 3.0, np.nan], [1.5, 5.0, np.nan]]
    got = _threshold_update(tau0, tb, 0.9)
    want1 = np.float32(0.9) * np.float32(1.0) + (np.float32(1) - np.float32(0.9)) * np.float32(4.0)
    assert got.dtype == np.float32
    assert got[0] == 1.0 and got[1] == want1 and got[2] == 2.0


def test_grad_accum_is_the_mean_of_micro_batch_gradients(tmp_path):
    """One step with grad_accum 2 applies the mean of the two micro-batches' gradients:
    rebuilt by hand with the model API (lr 0 so the step leaves the weights, and the
    gradient the optimizer saw is what the buffer holds)."""
    from racedit.factory import build_dataset, build_model
    from racedit.train import _Trainer, _resolve_config

    cfg, _ = _resolve_config(None, "tiny", None, dict(global_batch_size=8, grad_accum=2, lr=0.0))
    ds = build_dataset(cfg)
    m = build_model(cfg, ds.channels, ds.image_size, ds.num_classes)
    m2 = build_model(cfg, ds.channels, ds.image_size, ds.num_classes)
    tr = _Trainer(cfg, ds, m, str(tmp_path), False, None)
    tr2 = _Trainer(cfg, ds, m2, str(tmp_path), False, None)
    idx = tr.batch_indices(0)
    tr.train_step(layers=False)
    grads = []
    for j in range(2):
        m2.zero_grad()
        distributed._run_micro(tr2, j, idx[4 * j:4 * j + 4], False)
        grads.append(np.array(m2.grad_buffer))
    want = (grads[0] + grads[1]) * np.float32(0.5)
    assert np.array_equal(m.grad_buffer, want)
    assert not np.array_equal(grads[0], grads[1])


def test_grad_accum_in_device_memory_matches_the_host(tmp_path):
    """The device path (the backward accumulating in the model's buffer, then the scale),
    run on the checking backend: the same training as the host's pairwise sums, to
    rounding (another summation order)."""
    host = train(**TINY, grad_accum=2, results_dir=str(tmp_path / "h"))
    dev = train(**TINY, grad_accum=2, device="check", results_dir=str(tmp_path / "d"))
    np.testing.assert_allclose(dev.model.param_buffer, host.model.param_buffer, atol=1e-5)


def test_grad_accum_resume_is_bit_exact(tmp_path):
    full = train(**TINY, grad_accum=2, results_dir=str(tmp_path / "full"))
    part = train(**{**TINY, "steps": 3}, grad_accum=2, results_dir=str(tmp_path / "part"))
    res = train(resume=part.checkpoint, steps=6, final_samples=False, report=False,
                progress=False, threads=1)
    assert np.array_equal(res.model.param_buffer, full.model.param_buffer)
    assert np.array_equal(res.ema, full.ema)
    assert [r["loss"] for r in res.log] == [r["loss"] for r in full.log]


def test_resume_with_another_product_is_refused(tmp_path):
    part = train(**{**TINY, "steps": 2}, grad_accum=2, results_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"1 rank\(s\) x grad_accum 2 = 2 micro-batches.*"
                                         r"grad_accum 4 = 4.*same product"):
        train(resume=part.checkpoint, steps=4, grad_accum=4, progress=False)
    plain = train(**{**TINY, "steps": 2}, results_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"grad_accum 1 = 1 .*grad_accum 2 = 2.*--grad-accum 1"):
        train(resume=plain.checkpoint, steps=4, grad_accum=2, progress=False)


def test_plain_run_does_not_import_mpi(tmp_path):
    code = ("import sys, racedit\n"
            "racedit.train(preset='tiny', steps=1, final_samples=False, report=False,"
            " progress=False, results_dir='r')\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n")
    r = _cli(tmp_path, "", script=code)
    assert r.returncode == 0, r.stderr


def test_launcher_without_mpi4py_is_a_clear_error(tmp_path):
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.startswith('mpi4py'): raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import racedit\n"
            "try:\n"
            "    racedit.train(preset='tiny', steps=1, progress=False, results_dir='r')\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = python_env(drop=distributed._SIZE_VARS, PMI_SIZE="2")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert "with 2 ranks, but mpi4py is not installed" in r.stdout, r.stdout + r.stderr


# ---- two ranks -----------------------------------------------------------------------

def _check(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@needs_mpi
@pytest.mark.parametrize("accum", [1, 2])
def test_two_ranks_equal_one_rank_with_twice_the_accumulation(tmp_path, accum):
    flags = ("--steps", "10", "--global-batch-size", "8")
    _check(_cli(tmp_path, "two", *flags, "--grad-accum", str(accum), ranks=2))
    _check(_cli(tmp_path, "one", *flags, "--grad-accum", str(2 * accum)))
    _same(_tensors(tmp_path / "two"), _tensors(tmp_path / "one"))
    a, b = _log(tmp_path / "two"), _log(tmp_path / "one")
    keys = ("loss", "grad_norm", "max_violation", "tau", "ept_by_t", "attn_norm")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]
    assert all("allreduce_s" in r for r in a)
    assert len(os.listdir(tmp_path / "two")) == 1  # one run folder, rank 0's


@needs_mpi
def test_resume_on_another_layout_with_the_same_product(tmp_path):
    """2 ranks x 1 to step 5, resumed on 1 rank x 2 to step 10 = 2 ranks x 1 to step 10;
    the checkpoint holds both ranks' generators."""
    flags = ("--global-batch-size", "8", "--ckpt-every", "5")
    _check(_cli(tmp_path, "full", "--steps", "10", *flags, ranks=2))
    _check(_cli(tmp_path, "part", "--steps", "5", *flags, ranks=2))
    (ck,) = glob.glob(str(tmp_path / "part" / "*" / "checkpoints" / "0000005.safetensors"))
    from racedit.checkpoint import load_checkpoint

    meta = load_checkpoint(ck)[1]
    assert meta["distributed"]["world_size"] == 2 and len(meta["distributed"]["rng"]) == 2
    r = _check(subprocess.run(
        [sys.executable, "-m", "racedit", "train", "--resume", ck, "--steps", "10",
         "--grad-accum", "2", "--no-report", "--threads", "1"],
        cwd=tmp_path, env=python_env(drop=distributed._SIZE_VARS), capture_output=True,
        text=True, timeout=300))
    assert "resumed" in r.stdout
    full = _tensors(tmp_path / "full")
    (last,) = glob.glob(str(tmp_path / "part" / "*" / "checkpoints" / "0000010.safetensors"))
    _same(load_file(last), full)


FAILING = textwrap.dedent("""
    import numpy as np, racedit
    from racedit.data import ArrayDataset, load_builtin
    from racedit.distributed import world

    class Failing(ArrayDataset):
        calls = 0

        def batch(self, idx):
            x, y = super().batch(idx)
            self.calls += 1
            if world().rank == 1 and self.calls == 3:
                if MODE == "nan":
                    x[0, 0, 0, 0] = np.nan
                else:
                    raise OSError("reading shard 7: disk read failed")
            return x, y

    src = load_builtin(200, image_size=16)
    ds = Failing(src.x, src.y, src.num_classes)
    racedit.train(preset="tiny", steps=10, global_batch_size=8, dataset=ds, progress=False,
                  results_dir="r", final_samples=False, report=False, threads=1)
""")


@needs_mpi
@pytest.mark.parametrize("mode,message", [
    ("oserror", "rank 1/2: OSError: reading shard 7: disk read failed"),
    ("nan", "rank 1/2: ValueError: plr_target: non-finite value nan"),
])
def test_a_failing_rank_ends_the_job(tmp_path, mode, message):
    """Rank 1 fails at its third batch while rank 0 waits in the all-reduce: the job ends
    (a hang would reach the timeout) with rank 1's message and a non-zero status."""
    try:
        r = _cli(tmp_path, "", ranks=2, script=f"MODE = {mode!r}\n" + FAILING, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after a rank failed")
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-3000:]
