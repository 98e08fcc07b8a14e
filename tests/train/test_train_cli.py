"""``racedit.cli.main`` in process: every expected failure of train / report is one line
(``racedit <cmd>: error: ...``, exit 2; Ctrl-C exit 130), and the run-control flags
(--threads, the model shape flags, --channels, --log-layers-every-step, --plr-over-layers)
reach the run."""
import errno
import importlib
import inspect
import json
import os

import numpy as np
import pytest

from racedit.cli import main
from racedit.data import load_data
from racedit.train import TrainingDiverged

train_mod = importlib.import_module("racedit.train")
TINY = ["train", "--preset", "tiny", "--num-samples", "16", "--no-progress", "--no-report"]


def _fails(capsys, argv, text, status=2):
    assert main(argv) == status
    err = capsys.readouterr().err
    assert text in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"racedit {argv[0]}: ")
    return err


def test_bad_numbers_are_rejected_up_front(tmp_path, capsys):
    res = ["--results-dir", str(tmp_path / "r")]
    _fails(capsys, TINY + res + ["--cfg-scale", "nan"], "cfg_scale (--cfg-scale)")
    _fails(capsys, TINY + res + ["--cfg-scale", "inf"], "cfg_scale (--cfg-scale)")
    _fails(capsys, TINY + res + ["--num-sampling-steps", "0"], "--num-sampling-steps")
    _fails(capsys, TINY + res + ["--num-sampling-steps", "-3"], "--num-sampling-steps")
    _fails(capsys, TINY + res + ["--global-batch-size", "0"], "global_batch_size")
    _fails(capsys, TINY + res + ["--global-batch-size", "-2"], "global_batch_size")
    _fails(capsys, TINY + res + ["--threads", "0"], "threads")
    _fails(capsys, TINY + res + ["--num-classes", "4"], "--num-classes): 4 does not match")
    _fails(capsys, ["train", "--model", "DiT-T/2", "--no-progress"] + res,
           "give --steps N or --epochs N")
    assert not os.path.exists(tmp_path / "r")


def test_output_paths_that_cannot_be_written(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    _fails(capsys, TINY + ["--results-dir", str(f)], "is a file")
    _fails(capsys, TINY + ["--results-dir", str(f / "sub")], "is a file")
    _fails(capsys, TINY + ["--results-dir", "/proc/racedit-results"], "racedit-results")


def test_disk_full_is_one_line(tmp_path, capsys, monkeypatch):
    def full(path, tensors, meta):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(train_mod, "save_checkpoint", full)
    err = _fails(capsys, TINY + ["--steps", "1", "--results-dir", str(tmp_path)],
                 "No space left on device")
    assert "0000001.safetensors" in err


def test_diverged_keeps_its_text(tmp_path, capsys, monkeypatch):
    def diverge(self, layers=True):
        raise TrainingDiverged("training diverged at step 1: loss is nan; first non-finite "
                               "parameter in blocks.0.attn.qkv.weight")

    monkeypatch.setattr(train_mod._Trainer, "train_step", diverge)
    _fails(capsys, TINY + ["--steps", "2", "--results-dir", str(tmp_path)],
           "racedit train: error: training diverged at step 1: loss is nan; first non-finite "
           "parameter in blocks.0.attn.qkv.weight")
    run = os.path.join(tmp_path, "000-RaceDiT-tiny-4-2in4")
    with open(os.path.join(run, "log.txt")) as f:
        assert "stopped at step 0: TrainingDiverged: training diverged at step 1" in f.read()


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupt(self, layers=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod._Trainer, "train_step", interrupt)
    assert main(TINY + ["--steps", "2", "--results-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "racedit train: interrupted"


def test_resume_flag_errors(tmp_path, capsys):
    assert main(TINY + ["--steps", "2", "--results-dir", str(tmp_path)]) == 0
    ck = os.path.join(tmp_path, "000-RaceDiT-tiny-4-2in4", "checkpoints", "0000002.safetensors")
    capsys.readouterr()
    _fails(capsys, ["train", "--resume", ck, "--lr", "0.5", "--seed", "4"],
           "lr 0.5 (--lr) differs from the run's 0.001; seed 4 (--seed) differs")
    _fails(capsys, ["train", "--resume", str(tmp_path / "no.safetensors")], "not found")
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", ck, "--ckpt", ck])
    assert e.value.code == 2 and "give one" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    _fails(capsys, ["train", "--resume", str(tmp_path / "junk.safetensors")],
           "junk.safetensors")


def test_report_errors(tmp_path, capsys):
    _fails(capsys, ["report", "--ckpt", str(tmp_path / "none.safetensors")], "not found")
    assert main(TINY + ["--steps", "1", "--results-dir", str(tmp_path)]) == 0
    ck = os.path.join(tmp_path, "000-RaceDiT-tiny-4-2in4", "checkpoints", "0000001.safetensors")
    capsys.readouterr()
    _fails(capsys, ["report", "--ckpt", ck, "--batch", "0"], "--batch: expected >= 1")


def test_run_control_flags(tmp_path, capsys):
    argv = TINY + ["--steps", "2", "--results-dir", str(tmp_path), "--threads", "1",
                   "--depth", "3", "--hidden", "48", "--heads", "3", "--experts", "6",
                   "--k", "3", "--log-layers-every-step", "--log-every", "5",
                   "--plr-over-layers", "sum"]
    assert main(argv) == 0
    run = os.path.join(tmp_path, "000-RaceDiT-3x48-4-3in6")
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["model"] == "RaceDiT-3x48/4-3in6" and cfg["plr_over_layers"] == "sum"
    assert cfg["model_config"] == dict(depth=3, hidden=48, heads=3, patch=4, num_experts=6,
                                       k=3, expert_hidden=64)
    with open(os.path.join(run, "log.jsonl")) as f:
        assert all("max_violation" in json.loads(line) for line in f)
    assert main(TINY + ["--steps", "1", "--results-dir", str(tmp_path / "q"), "--model",
                        "RaceDiT-quick/4-2in8", "--global-batch-size", "4"]) == 0
    assert os.path.isdir(os.path.join(tmp_path, "q", "000-RaceDiT-quick-4-2in8"))


@pytest.mark.skipif("channels" not in inspect.signature(load_data).parameters,
                    reason="racedit.data.load_data takes no channels= here")
def test_channels_one_trains_grayscale(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            rgb = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / "img" / c / f"{i}.png")
    argv = ["train", "--preset", "tiny", "--data", "folder", str(tmp_path / "img"),
            "--image-size", "16", "--channels", "1", "--steps", "1", "--global-batch-size",
            "4", "--no-progress", "--no-report", "--results-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    run = os.path.join(tmp_path, "r", "000-RaceDiT-tiny-4-2in4")
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["channels"] == 1 and "num_samples" not in cfg
    m, _ = train_mod.model_from_checkpoint(os.path.join(run, "checkpoints", "0000001.safetensors"))
    assert m.in_channels == 1
