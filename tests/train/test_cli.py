"""``python -m racedit``: --help, a 3-step train, a 2-step sample, a report, and errors, each
in a subprocess as a user would run them."""
import glob
import json
import os

from _subproc import PKG_PARENT, run_cli

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd, check=True):
    return run_cli(*args, cwd=cwd, check=check)


def test_help(tmp_path):
    out = _cli("--help", cwd=tmp_path).stdout
    assert "train" in out and "sample" in out
    tr = _cli("train", "--help", cwd=tmp_path).stdout
    for flag in ("--model", "--image-size", "--global-batch-size", "--epochs", "--steps",
                 "--ckpt", "--ckpt-every", "--results-dir", "--data", "--seed", "--lr",
                 "--weight-decay", "--grad-clip", "--warmup-steps", "--ema-decay",
                 "--log-every", "--sample-every", "--routing", "--gating", "--objective",
                 "--plr-weight", "--sim-weight", "--balance-weight", "--resume", "--preset"):
        assert flag in tr, flag
    sa = _cli("sample", "--help", cwd=tmp_path).stdout
    for flag in ("--ckpt", "--cfg-scale", "--num-sampling-steps", "--seed", "--sampler",
                 "--class-labels", "--npz"):
        assert flag in sa, flag


def test_train_sample_report(tmp_path):
    p = _cli("train", "--preset", "tiny", "--steps", "3", "--num-samples", "40",
             "--global-batch-size", "8", "--no-progress", "--results-dir", "res", cwd=tmp_path)
    assert "done in" in p.stdout
    run = glob.glob(str(tmp_path / "res" / "000-*"))[0]
    assert os.path.basename(run) == "000-RaceDiT-tiny-4-2in4"
    with open(os.path.join(run, "log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    ck = os.path.join(run, "checkpoints", "0000003.safetensors")
    assert os.path.exists(ck)
    assert os.path.exists(os.path.join(run, "routing_report-0000003.png"))
    assert os.path.exists(os.path.join(run, "samples", "0000003.png"))

    _cli("sample", "--ckpt", ck, "--num-sampling-steps", "2", "--class-labels", "0,1,9",
         "--seed", "3", "--out", "s.png", "--npz", "--no-progress", cwd=tmp_path)
    assert os.path.getsize(tmp_path / "s.png") > 100 and os.path.exists(tmp_path / "s.npz")

    _cli("report", "--ckpt", ck, "--batch", "8", cwd=tmp_path)
    rep = json.load(open(os.path.join(run, "routing_report-0000003.json")))
    assert rep["model"] == "RaceDiT-tiny/4-2in4"

    p = _cli("train", "--resume", ck, "--steps", "4", "--no-progress", "--no-report", cwd=tmp_path)
    assert "resumed" in p.stdout
    assert os.path.exists(os.path.join(run, "checkpoints", "0000004.safetensors"))


def test_errors_are_one_line(tmp_path):
    p = _cli("train", "--data", "folder", str(tmp_path / "missing"), "--steps", "1",
             "--no-progress", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "missing: image folder not found" in p.stderr
    assert "Traceback" not in p.stderr
    p = _cli("train", "--data", "mnist", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "needs exactly one PATH" in p.stderr
    p = _cli("train", "--data", str(tmp_path), cwd=tmp_path, check=False)  # a path, no kind
    assert p.returncode == 2 and "is not a data kind" in p.stderr and "cifar10" in p.stderr
    assert f"--data folder {tmp_path}" in p.stderr
    p = _cli("sample", "--ckpt", str(tmp_path / "none.safetensors"), cwd=tmp_path, check=False)
    assert p.returncode == 2 and "checkpoint not found" in p.stderr
    p = _cli("train", "--objective", "edm", cwd=tmp_path, check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("PYTHONPATH", PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the notebook's run goes
    monkeypatch.setenv("RACEDIT_QUICKSTART_STEPS", "30")  # the notebook's 1500 take minutes
    nb = nbformat.read(os.path.join(ROOT, "examples", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # data, loss, samples, routing plots inline
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "30 steps in" in text
    assert os.listdir(tmp_path) == ["tmp"]  # nothing written next to the notebook
