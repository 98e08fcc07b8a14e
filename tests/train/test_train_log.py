"""What a run leaves on disk and how resuming treats it: the log is never cut (resume
events, each step's latest record), records reach the disk before their checkpoint, a torn
last line is dropped with a warning, per-step routing reports, log.txt, the per-layer
statistics cadence, config.json, and resuming checks its flags and its run folder."""
import importlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from test_train import _run

import racedit
from racedit import runs
from racedit.checkpoint import load_checkpoint
from racedit.train import read_log, train

train_mod = importlib.import_module("racedit.train")  # the module; racedit.train is the function
QUIET = dict(progress=False, final_samples=False, report=False)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _resume(ck, **kw):
    return train(resume=ck, out=kw.pop("out", io.StringIO()), **{**QUIET, **kw})


def test_resume_keeps_the_log_and_marks_the_resumption(tmp_path):
    a = _run(tmp_path, 6, ckpt_every=3)
    log = os.path.join(a.run_dir, "log.jsonl")
    before = _lines(log)
    ck = os.path.join(a.run_dir, "checkpoints", "0000003.safetensors")
    out = io.StringIO()
    b = _resume(ck, steps=8, out=out)
    after = _lines(log)
    assert after[:6] == before  # nothing dropped
    ev = after[6]
    assert ev["event"] == "resume" and ev["step"] == 3 and ev["from"] == os.path.abspath(ck)
    assert ev["changed"] == {"steps": [6, 8]}
    assert [r["step"] for r in after[7:]] == [4, 5, 6, 7, 8]
    assert [r["step"] for r in read_log(log)] == list(range(1, 9))
    assert [r["loss"] for r in b.log[:6]] == [r["loss"] for r in a.log]  # bit-exact on CPU
    said = out.getvalue()
    assert "changed: steps 6 -> 8" in said
    assert "records of steps 4-6" in said and "checkpoints 0000006" in said
    with open(os.path.join(a.run_dir, "log.txt")) as f:
        assert "resumed" in f.read()


def test_read_log_takes_each_steps_latest_record(tmp_path):
    p = tmp_path / "log.jsonl"
    recs = [{"step": 1, "v": "a"}, {"step": 2, "v": "a"}, {"step": 3, "v": "a"},
            {"event": "resume", "step": 1}, {"step": 2, "v": "b"}, {"step": 3, "v": "b"},
            {"step": 4, "v": "b"}, {"event": "resume", "step": 3}, {"step": 4, "v": "c"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [(r["step"], r["v"]) for r in read_log(str(p))] == [
        (1, "a"), (2, "b"), (3, "b"), (4, "c")]
    assert [r["v"] for r in read_log(str(p), upto_step=2)] == ["a", "b"]
    # as a checkpoint written after the 7th line saw it
    upto = sum(len(json.dumps(r)) + 1 for r in recs[:7])
    assert [(r["step"], r["v"]) for r in read_log(str(p), upto_bytes=upto)] == [
        (1, "a"), (2, "b"), (3, "b"), (4, "b")]
    p.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON record"):
        read_log(str(p))


def test_appending_starts_a_new_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}')  # complete, only the newline missing
    runs.repair_tail(str(p), io.StringIO())
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
    p.write_text('{"step": 1}\n{"step": 2, "lo')
    out = io.StringIO()
    runs.repair_tail(str(p), out)
    assert p.read_text() == '{"step": 1}\n' and "torn last line (15 bytes" in out.getvalue()


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    a = _run(tmp_path, 4, ckpt_every=2)
    log = os.path.join(a.run_dir, "log.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # a kill in the middle of a write
    assert [r["step"] for r in read_log(log)] == [1, 2, 3, 4]
    assert "dropped a torn last line" in capsys.readouterr().err
    out = io.StringIO()
    b = _resume(os.path.join(a.run_dir, "checkpoints", "0000002.safetensors"), steps=5,
                out=out)
    assert "dropped a torn last line" in out.getvalue()
    assert [r["step"] for r in b.log] == [1, 2, 3, 4, 5]
    assert all(isinstance(r, dict) for r in _lines(log))  # every line parses again


def test_records_reach_the_disk_before_their_checkpoint(tmp_path, monkeypatch):
    seen = {}
    real = train_mod.save_checkpoint

    def save(path, tensors, meta):
        with open(os.path.join(meta["run_dir"], "log.jsonl")) as f:
            seen[meta["step"]] = (len(f.readlines()), meta["log_bytes"],
                                  os.path.getsize(f.name))
        real(path, tensors, meta)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    _run(tmp_path, 6, ckpt_every=2, log_every=100)
    for step, (n, log_bytes, size) in seen.items():
        assert n == step and log_bytes == size, (step, n, log_bytes, size)


def test_report_of_a_checkpoint_uses_its_own_records(tmp_path):
    from racedit.cli import main

    a = _run(tmp_path, 10, ckpt_every=5, report=True)
    assert os.path.exists(os.path.join(a.run_dir, "routing_report-0000010.json"))
    ck = os.path.join(a.run_dir, "checkpoints", "0000005.safetensors")
    assert main(["report", "--ckpt", ck, "--batch", "4"]) == 0
    rep = json.load(open(os.path.join(a.run_dir, "routing_report-0000005.json")))
    assert rep["step"] == 5 and rep["train"]["steps"][-1] == 5
    # the end-of-run report is still there, untouched
    rep10 = json.load(open(os.path.join(a.run_dir, "routing_report-0000010.json")))
    assert rep10["train"]["steps"][-1] == 10


def test_report_says_when_it_replaces_one(tmp_path, capsys):
    from racedit.cli import main

    a = _run(tmp_path, 2, report=True)
    assert main(["report", "--ckpt", a.checkpoint, "--batch", "4"]) == 0
    assert "replacing the earlier report of this step" in capsys.readouterr().out


def test_log_txt_and_layer_statistics_cadence(tmp_path):
    a = _run(tmp_path, 12, log_every=5)
    recs = _lines(os.path.join(a.run_dir, "log.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, 13))
    layered = [r["step"] for r in recs if "max_violation" in r]
    assert layered == [5, 10, 12]
    assert [r["step"] for r in recs if "ept_by_t" in r] == [5, 10, 12]
    assert all("loss" in r and "grad_norm" in r for r in recs)
    with open(os.path.join(a.run_dir, "log.txt")) as f:
        txt = f.read()
    steps = [line for line in txt.splitlines() if "] step " in line]
    assert [s.split("] step ")[1].split(":")[0] for s in steps] == ["5/12", "10/12", "12/12"]
    assert "img/s" in steps[0] and "loss" in steps[0] and "saved" in txt
    b = _run(tmp_path / "b", 3, log_every=5, log_layers_every_step=True)
    assert all("max_violation" in r and "attn_norm" in r for r in b.log)


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capfd):
    train(preset="tiny", steps=3, num_samples=16, results_dir=str(tmp_path),
          out=io.StringIO(), report=False, num_sampling_steps=2)  # progress: the default
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err and "step/s" not in err


def test_config_json_records_version_commit_and_the_data_settings_that_apply(tmp_path,
                                                                             monkeypatch):
    a = _run(tmp_path, 1)
    cfg = json.load(open(os.path.join(a.run_dir, "config.json")))
    assert cfg["racedit_version"] == racedit.__version__
    root = runs._source_root()
    if os.path.exists(os.path.join(root, ".git")):
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert cfg["git_commit"] == head
    assert cfg["num_samples"] == 64 and "data_path" not in cfg  # builtin
    monkeypatch.setattr(runs, "_source_root", lambda: str(tmp_path))  # not a checkout
    lat = tmp_path / "lat"
    for sub in ("features", "labels"):
        (lat / sub).mkdir(parents=True)
    r = np.random.default_rng(0)
    for i in range(8):
        np.save(lat / "features" / f"{i}.npy", r.standard_normal((4, 8, 8)).astype(np.float32))
        np.save(lat / "labels" / f"{i}.npy", np.int64(i % 3))
    b = _run(tmp_path / "b", 1, data="latents", data_path=str(lat), objective="flow")
    cfg = json.load(open(os.path.join(b.run_dir, "config.json")))
    assert cfg["git_commit"] is None
    for key in ("image_size", "num_samples", "channels"):
        assert key not in cfg, key
    assert cfg["data_path"] == str(lat) and "num_classes" in cfg


def test_steps_or_epochs_is_required(tmp_path):
    with pytest.raises(ValueError, match=r"give --steps N or --epochs N"):
        train("RaceDiT-T/2-2in4", results_dir=str(tmp_path / "r"), **QUIET)
    assert not os.path.exists(tmp_path / "r")


def test_epochs_replace_the_presets_steps(tmp_path):
    res = train(preset="tiny", epochs=1, num_samples=16, global_batch_size=8,
                results_dir=str(tmp_path), out=io.StringIO(), **QUIET)
    assert len(res.log) == 2 and res.config.steps is None


def test_resume_rejects_settings_it_would_ignore(tmp_path):
    a = _run(tmp_path, 2, seed=1)
    for kw, text in ((dict(lr=0.5), r"lr 0\.5 \(--lr\) differs from the run's 0\.001"),
                     (dict(seed=3), r"seed 3 \(--seed\) differs"),
                     (dict(routing="token"), r"routing 'token' \(--routing\)"),
                     (dict(objective="flow"), r"objective 'flow'"),
                     (dict(global_batch_size=4), r"global_batch_size 4"),
                     (dict(data="mnist", data_path="x"), r"data_path 'x' \(--data\)"),
                     (dict(model_config=dict(depth=3)), r"depth 3 \(--depth\)"),
                     (dict(model="DiT-T/2"), r"model 'DiT-T/2'")):
        with pytest.raises(ValueError, match=text):
            _resume(a.checkpoint, **kw)
    with pytest.raises(ValueError, match=r"preset 'tiny'"):
        _resume(a.checkpoint, preset="tiny")
    # the run's own values are no conflict
    b = _resume(a.checkpoint, steps=3, seed=1, lr=1e-3, model="RaceDiT-tiny/4-2in4")
    assert len(b.log) == 3


def test_checkpoint_outside_its_run_folder(tmp_path):
    a = _run(tmp_path / "one", 2)
    lone = tmp_path / "elsewhere" / "deep"
    lone.mkdir(parents=True)
    ck = str(lone / "model.safetensors")
    shutil.copy(a.checkpoint, ck)
    with pytest.raises(ValueError, match=r"not in a run folder.*--results-dir"):
        _resume(ck, steps=3)
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["deep"]  # nothing scattered
    b = _resume(ck, steps=3, results_dir=str(tmp_path / "new"))
    assert os.path.dirname(b.run_dir) == str(tmp_path / "new")
    recs = _lines(os.path.join(b.run_dir, "log.jsonl"))
    assert recs[0]["event"] == "resume" and recs[0]["step"] == 2
    assert [r["step"] for r in b.log] == [3]
    assert load_checkpoint(b.checkpoint)[1]["run_dir"] == b.run_dir


def test_resume_into_a_new_run_folder_copies_the_history(tmp_path):
    a = _run(tmp_path / "one", 4, ckpt_every=2)
    ck = os.path.join(a.run_dir, "checkpoints", "0000002.safetensors")
    b = _resume(ck, results_dir=str(tmp_path / "two"))
    assert b.run_dir != a.run_dir and len(_lines(os.path.join(a.run_dir, "log.jsonl"))) == 4
    assert [r["loss"] for r in b.log] == [r["loss"] for r in a.log]
    recs = _lines(os.path.join(b.run_dir, "log.jsonl"))
    assert [r.get("event", r["step"]) for r in recs] == [1, 2, "resume", 3, 4]


def test_interrupt_is_logged_and_names_the_latest_checkpoint(tmp_path, monkeypatch):
    real = train_mod._Trainer.train_step

    def step(self, layers=True):
        if self.step == 3:
            raise KeyboardInterrupt
        return real(self, layers)

    monkeypatch.setattr(train_mod._Trainer, "train_step", step)
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, 6, ckpt_every=2, out=out)
    run = os.path.join(tmp_path, "results", "000-RaceDiT-tiny-4-2in4")
    assert "interrupted at step 3" in out.getvalue()
    assert "--resume " + os.path.join(run, "checkpoints", "0000002.safetensors") in out.getvalue()
    assert [r["step"] for r in _lines(os.path.join(run, "log.jsonl"))] == [1, 2, 3]
    with open(os.path.join(run, "log.txt")) as f:
        assert "interrupted at step 3" in f.read()


def test_model_shape_and_preset_model_names(tmp_path):
    quick = train("RaceDiT-quick/4-2in8", steps=1, global_batch_size=4, num_samples=8,
                  results_dir=str(tmp_path / "q"), out=io.StringIO(), **QUIET)
    assert quick.model.config.hidden == 128 and quick.model.config.num_experts == 8
    res = _run(tmp_path, 1, mc=dict(depth=3))  # the tiny preset's model, one block more
    c = res.model.config
    assert c.name == "RaceDiT-3x32/4-2in4" and (c.depth, c.hidden, c.expert_hidden) == (3, 32, 64)
    assert os.path.basename(res.run_dir) == "000-RaceDiT-3x32-4-2in4"
    res = _run(tmp_path, 1, model="RaceDiT-T/2-2in4", mc=dict(hidden=48, k=1, patch=4))
    c = res.model.config
    assert c.name == "RaceDiT-2x48/4-1in4" and c.expert_hidden == 192  # 4*D/k
    m, _ = train_mod.model_from_checkpoint(res.checkpoint)
    assert m.config == c
    res = _run(tmp_path, 1, model="RaceDiT-T/2-2in4", mc=dict(num_experts=0, patch=4))
    assert res.model.config.name == "DiT-2x32/4" and not res.model.config.is_moe
    with pytest.raises(ValueError, match="unknown fields"):
        _run(tmp_path, 1, mc=dict(width=3))
    with pytest.raises(ValueError, match="needs k"):
        _run(tmp_path, 1, model="DiT-T/4", mc=dict(num_experts=4))
    with pytest.raises(ValueError, match="needs"):
        _run(tmp_path, 1, model="Custom/4", mc=dict(depth=2))


def test_threads_limit_the_run(tmp_path, monkeypatch):
    calls = []
    real = train_mod.thread_limit
    monkeypatch.setattr(train_mod, "thread_limit", lambda n: calls.append(n) or real(n))
    _run(tmp_path, 1, threads=1)
    assert calls == [1]
    with pytest.raises(ValueError, match="threads"):
        _run(tmp_path, 1, threads=0)


def test_sample_settings_checked_before_training(tmp_path):
    for kw, text in ((dict(cfg_scale=float("nan")), "cfg_scale"),
                     (dict(cfg_scale=float("inf")), "cfg_scale"),
                     (dict(num_sampling_steps=0), "num_sampling_steps"),
                     (dict(sampler="ddim", objective="flow"), "sampler"),
                     (dict(num_classes=0), "num_classes"),
                     (dict(channels=2), "channels")):
        with pytest.raises(ValueError, match=text):
            _run(tmp_path, 1, **kw)
    assert not os.path.exists(tmp_path / "results")


def test_num_classes_must_match_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"num_classes \(--num-classes\): 5 does not match the "
                                         r"data, which has 10"):
        _run(tmp_path, 1, num_classes=5)
    assert len(_run(tmp_path, 1, num_classes=10).log) == 1


def test_steps_zero_runs_to_completion(tmp_path):
    # The sample grid and the report route with thresholds no step has set yet: this needs
    # the eval routing's batch top-K fallback for a layer without a threshold.
    res = _run(tmp_path, 0, final_samples=True, report=True, objective="flow", sampler="euler",
               num_sampling_steps=2)
    assert res.log == [] and os.path.exists(res.checkpoint)
    assert os.path.exists(os.path.join(res.run_dir, "samples", "0000000.png"))
    assert os.path.exists(os.path.join(res.run_dir, "routing_report-0000000.json"))
