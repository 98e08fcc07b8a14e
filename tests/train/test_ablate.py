"""The ablation studies (racedit.ablate) at the toy budget: every study runs end to end and
writes its table, summary and plots; runs are paired (same data order, initial weights and
noise; identical validation inputs whatever the routing); a restarted study retrains only
the runs without a finished marker; the CLI and the example notebook; bad arguments."""
import hashlib
import json
import math
import os
import sys

import numpy as np
import pytest

import racedit
from _subproc import PKG_PARENT

from racedit.ablate import (BUDGETS, PLR_DEPTHS, PLR_WEIGHTS, STUDIES, _smooth, _speedup, ablate,
                            study_runs)
from racedit.model import RaceDiT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ABLATE = sys.modules["racedit.ablate"]


def _records(out):
    recs = {}
    for run in os.listdir(os.path.join(out, "runs")):
        for s in os.listdir(os.path.join(out, "runs", run)):
            p = os.path.join(out, "runs", run, s, "result.json")
            if os.path.exists(p):
                with open(p) as f:
                    recs[(run, s)] = json.load(f)
    return recs


@pytest.fixture(scope="module")
def routing_toy(tmp_path_factory):
    """The routing study at the toy budget with every eval-mode forward's inputs hashed
    (per routing strategy), and the trainer's calls counted."""
    out = str(tmp_path_factory.mktemp("abl") / "routing")
    seen = {}
    forward = RaceDiT.forward

    def spy(self, x, t, y, plr_target=None):
        if not self.training:
            h = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.asarray(t).tobytes()
                               + np.asarray(y).tobytes()).hexdigest()
            seen.setdefault(self.routing, []).append(h)
        return forward(self, x, t, y, plr_target)

    mp = pytest.MonkeyPatch()
    mp.setattr(RaceDiT, "forward", spy)
    try:
        res = ablate("routing", budget="toy", seeds=(0,), out=out, progress=False,
                     stream=open(os.devnull, "w"), threads=1)
    finally:
        mp.undo()
    return out, res, seen


def test_routing_toy_writes_table_summary_and_plots(routing_toy):
    out, res, _ = routing_toy
    with open(os.path.join(out, "table.md")) as f:
        table = f.read()
    assert table == res.table
    for label in ("Token choice", "Expert choice", "BL choice", "BE choice", "LE choice",
                  "Expert race"):
        assert f"| {label} |" in table
    with open(os.path.join(out, "summary.json")) as f:
        summ = json.load(f)
    runs = summ["aggregate"]["runs"]
    assert set(runs) == {"token", "expert", "bl", "be", "le", "race"}
    for a in runs.values():
        assert np.isfinite(a["heldout_ema"][0]) and len(a["heldout_by_t"]) == 10
        assert len(a["ept_by_t"]) == 10 and a["max_violation"][0] >= 0
    for name in ("loss_curves.png", "allocation.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_are_paired(routing_toy):
    out, _, seen = routing_toy
    recs = _records(out)
    # identical validation inputs for every routing strategy
    assert set(seen) == {"token", "expert", "bl", "be", "le", "race"}
    streams = {tuple(v) for v in seen.values()}
    assert len(streams) == 1 and len(next(iter(streams))) > 0
    assert len({r["fingerprint"] for r in recs.values()}) == 1
    # same data, initial weights and noise: the adaLN-Zero model's first step does not yet
    # see the MoE, so its loss is the same for every routing
    first = set()
    for (run, s), r in recs.items():
        rd = r["run_dir"]
        with open(os.path.join(rd, "log.jsonl")) as f:
            first.add(json.loads(f.readline())["diffusion"])
        with open(os.path.join(rd, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["routing"] == run and cfg["gating"] == "identity"
        assert cfg["steps"] == BUDGETS["toy"]["steps"] and cfg["seed"] == 0
    assert len(first) == 1
    assert len({r["activated_params"] for r in recs.values()}) == 1


def test_restart_reruns_only_unfinished(routing_toy, monkeypatch):
    out, _, _ = routing_toy
    marker = os.path.join(out, "runs", "bl", "seed0", "result.json")
    before = {k: v["eval"]["ema"]["loss"] for k, v in _records(out).items()}
    os.remove(marker)
    calls = []
    real = ABLATE._train_one

    def counting(run, seed, *a):
        calls.append((run.name, seed))
        return real(run, seed, *a)

    monkeypatch.setattr(ABLATE, "_train_one", counting)
    ablate("routing", budget="toy", seeds=(0,), out=out, progress=False,
           stream=open(os.devnull, "w"), threads=1)
    assert calls == [("bl", 0)]
    after = {k: v["eval"]["ema"]["loss"] for k, v in _records(out).items()}
    assert after == before  # the retrained run is bit-identical (CPU, same seed)
    # a folder made with other settings is refused
    with pytest.raises(ValueError, match="other settings"):
        ablate("balance", budget="toy", out=out, progress=False)


@pytest.mark.parametrize("study", [s for s in STUDIES if s != "routing"])
def test_study_toy_end_to_end(study, tmp_path):
    res = ablate(study, budget="toy", seeds=(0,), out=str(tmp_path), progress=True, threads=1)
    runs = study_runs(study, "toy")
    for r in runs:
        assert f"| {r.label} |" in res.table
    assert "Model: blocks " in res.table and "Training: flow objective" in res.table
    assert os.path.exists(tmp_path / "table.md") and os.path.exists(tmp_path / "summary.json")
    agg = res.summary["aggregate"]["runs"]
    if study == "scaling":
        assert "speed-up" in res.table
        dense = [r for r in runs if r.moe is None]
        moe = [r for r in runs if r.moe is not None]
        assert dense and moe
        for r in moe:  # equal activated FFN width: He = 4D/k
            d = next(x for x in dense if x.hidden == r.hidden)
            assert agg[r.name]["activated_params"] >= agg[d.name]["activated_params"]
            assert "speedup" in agg[r.name]
    if study == "gating":
        assert "| identity |" in res.table and "| softmax |" in res.table
    if study == "balance":
        assert all(agg[r.name]["combination_usage"][0] is not None for r in runs)
    if study == "components":
        assert [r.eval_topk for r in runs] == [True, True, False, False, False]
    if study == "plr":
        _check_plr_toy(tmp_path, res, runs)


def _check_plr_toy(out, res, runs):
    """Every depth's runs train at that depth with the run's PLR weight and mode, are
    compared with PLR off at their depth, and the table shows their branch norms."""
    agg = res.summary["aggregate"]["runs"]
    for r in runs:
        with open(os.path.join(out, "runs", r.name, "seed0", "result.json")) as f:
            rec = json.load(f)
        with open(os.path.join(rec["run_dir"], "config.json")) as f:
            cfg = json.load(f)
        assert cfg["model_config"]["depth"] == r.depth and cfg["steps"] == r.steps
        assert cfg["plr_weight"] == r.settings["plr_weight"]
        assert cfg["plr_over_layers"] == r.settings.get("plr_over_layers", "mean")
        assert [len(v) for v in rec["branch_norms"].values()] == [r.depth, r.depth]
        assert len(agg[r.name]["branch_norms"]["ffn"]) == r.depth
    assert res.table.count("| 0 (ref) |") == len(PLR_DEPTHS["toy"])
    assert "Δ vs PLR off at the same depth" in res.table
    for depth, _ in PLR_DEPTHS["toy"]:
        assert f"MoE branch norm per block, {depth} blocks" in res.table
        assert f"Attention branch norm per block, {depth} blocks" in res.table
    assert os.path.exists(os.path.join(out, "branch_norms.png"))


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_gating_study_is_the_bare_setting(budget):
    # the paper's Table 1 setting: batch top-K at evaluation, no PLR, no router similarity;
    # its race rows are the components study's first two runs
    runs = {r.name: r for r in study_runs("gating", budget)}
    for r in runs.values():
        assert r.eval_topk and r.settings["plr_weight"] == 0 and r.settings["sim_weight"] == 0
    comp = {r.name: r for r in study_runs("components", budget)}
    for g, c in (("race-softmax", "race-softmax"), ("race-identity", "identity")):
        assert (runs[g].settings, runs[g].eval_topk) == (comp[c].settings, comp[c].eval_topk)
    text = ABLATE._configuration("gating", budget, list(runs.values()))
    assert "PLR off; router similarity off" in text and "batch top-K" in text


@pytest.mark.parametrize("budget", ["medium", "large"])
def test_balance_is_4_in_32_from_medium_up(budget):
    runs = study_runs("balance", budget)
    assert {r.moe for r in runs} == {(4, 32)}
    assert "E/k - 1 = 7 at 4-in-32" in ABLATE._configuration("balance", budget, runs)


def test_balance_configuration_bounds_maxvio_by_its_e():
    text = ABLATE._configuration("balance", "small", study_runs("balance", "small"))
    assert "experts 4-in-16" in text and "E/k - 1 = 3 at 4-in-16" in text


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_plr_study_grid(budget):
    runs = study_runs("plr", budget)
    assert len(runs) == len(PLR_DEPTHS[budget]) * (1 + 2 * len(PLR_WEIGHTS))
    for depth, steps in PLR_DEPTHS[budget]:
        rs = [r for r in runs if r.depth == depth]
        assert all(r.steps == steps and r.reference == f"d{depth}-off" for r in rs)
        grid = {(r.settings.get("plr_over_layers", "mean"), r.settings["plr_weight"]) for r in rs}
        assert grid == {("mean", 0.0)} | {(m, w) for m in ("mean", "sum") for w in PLR_WEIGHTS}
        assert all(r.settings["sim_weight"] == 0.01 and not r.eval_topk for r in rs)
    if budget != "toy":
        assert [d for d, _ in PLR_DEPTHS[budget]] == [6, 12]


def test_study_json_of_other_studies_is_unchanged():
    # depth / steps / reference appear only in studies that set them, so folders of the
    # other studies made before they existed still resume
    for study in STUDIES:
        s = ABLATE._settings(study, "toy", BUDGETS["toy"], [0], study_runs(study, "toy"), "flow")
        assert s["objective"] == "flow"
        extra = {"depth", "steps", "reference"} if study == "plr" else set()
        assert all(set(r) == {"name", "label", "settings", "moe", "hidden", "eval_topk",
                              "group"} | extra for r in s["runs"])


def test_two_seeds_give_std(tmp_path):
    res = ablate("balance", budget="toy", seeds=(0, 1), out=str(tmp_path), progress=False,
                 stream=open(os.devnull, "w"), threads=1)
    a = res.summary["aggregate"]["runs"]["none"]
    assert a["seeds"] == [0, 1] and a["heldout_ema"][1] > 0
    assert " ± " in res.table


def test_speedup_and_smoothing():
    np.testing.assert_allclose(_smooth([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    dense = np.linspace(2.0, 1.0, 100)
    moe = np.linspace(2.0, 0.0, 100)        # reaches 1.0 about halfway
    steps, sp = _speedup(dense, moe, 1)
    assert steps == 51 and sp == pytest.approx(100 / 51)
    assert _speedup(moe, dense, 1) == (None, None)
    assert _speedup(dense, np.full(100, 0.5), 10)[0] == 10  # counted once the window is full


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="study"):
        ablate("nope", budget="toy", out=str(tmp_path))
    with pytest.raises(ValueError, match="budget"):
        ablate("routing", budget="huge", out=str(tmp_path))
    with pytest.raises(ValueError, match="device"):
        ablate("routing", budget="toy", device="tpu", out=str(tmp_path))
    with pytest.raises(ValueError, match="seeds"):
        ablate("routing", budget="toy", seeds=(), out=str(tmp_path))
    with pytest.raises(ValueError, match="seeds"):
        ablate("routing", budget="toy", seeds=(1, 1), out=str(tmp_path))
    with pytest.raises(ValueError, match="threads"):
        ablate("routing", budget="toy", threads=0, out=str(tmp_path / "t"))


def test_cli(tmp_path, capsys):
    from racedit.cli import main

    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    helptext = capsys.readouterr().out
    for b in BUDGETS:
        assert f"  {b}: " in helptext
    assert "--study" in helptext and "--seeds" in helptext
    assert main(["ablate", "--study", "components", "--budget", "toy", "--out",
                 str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    assert "+ router similarity" in capsys.readouterr().out


@pytest.mark.skipif(racedit.cuda_available(), reason="a CUDA device is present")
def test_cuda_refused_without_a_gpu(tmp_path):
    from racedit.cli import main

    with pytest.raises(ValueError, match="CUDA not available"):
        ablate("routing", budget="toy", device="cuda", out=str(tmp_path))
    assert main(["ablate", "--study", "routing", "--budget", "toy", "--device", "cuda",
                 "--out", str(tmp_path / "c")]) == 2


def test_routing_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the notebook's run goes
    nb = nbformat.read(os.path.join(ROOT, "examples", "ablation_routing.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outs) >= 2
    assert any("Expert race" in o.get("data", {}).get("text/markdown", "") for o in outs)
    assert os.listdir(tmp_path) == ["tmp"]  # nothing written next to the notebook


def test_ddpm_objective(tmp_path, monkeypatch):
    """objective="ddpm": every run trains DiT's eps objective, the held-out set is eps
    MSE, samples come from DDIM, the table says so and the default folder is kept apart."""
    monkeypatch.chdir(tmp_path)
    res = ablate("balance", budget="toy", seeds=(0,), progress=False, threads=1,
                 stream=open(os.devnull, "w"), metric="both", objective="ddpm")
    assert res.out == str(tmp_path / "results" / "ablate-balance-toy-ddpm")
    assert "Training: ddpm objective" in res.table and "ddpm, noise MSE" in res.table
    assert res.summary["objective"] == "ddpm" and res.summary["sample_eval"]["sampler"] == "ddim"
    for r in study_runs("balance", "toy"):
        with open(os.path.join(res.out, "runs", r.name, "seed0", "result.json")) as f:
            rec = json.load(f)
        with open(os.path.join(rec["run_dir"], "config.json")) as f:
            assert json.load(f)["objective"] == "ddpm"
        assert rec["samples"]["settings"]["sampler"] == "ddim"
    with pytest.raises(ValueError, match="other settings"):
        ablate("balance", budget="toy", out=res.out, progress=False, objective="flow")
    with pytest.raises(ValueError, match=r"objective: expected one of \('ddpm', 'flow'\), got 'eps'"):
        ablate("balance", budget="toy", out=str(tmp_path / "x"), progress=False, objective="eps")


def test_inference_routing_benchmark(routing_toy, monkeypatch, capsys):
    """benchmarks/bench_infer_routing.py on a finished routing study: one row per strategy
    and one of training's beside it; token, expert and LE choice select exactly k at every
    single timestep, and every value is a count of experts between 0 and E (training's:
    nan for a bucket the log's last fifth never reached, never a made-up 0)."""
    import importlib.util

    out, _, _ = routing_toy
    path = os.path.join(ROOT, "benchmarks", "bench_infer_routing.py")
    spec = importlib.util.spec_from_file_location("bench_infer_routing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["bench_infer_routing.py", out, "--images", "4"])
    bench.main()
    rows = {line.split("|")[1].strip(): [float(v.split()[0]) for v in line.split("|")[2:-3]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
            and not line.startswith("| strategy")}
    k, E = BUDGETS["toy"]["moe"]
    for r in ("token", "expert", "bl", "be", "le", "race"):
        assert len(rows[r]) == len(bench.T_GRID) and len(rows[r + ", training"]) == len(bench.T_GRID)
        assert all(0 <= v <= E for v in rows[r])
        trained = [v for v in rows[r + ", training"] if not math.isnan(v)]
        assert trained and all(0 <= v <= E for v in trained)
    for r in ("token", "expert", "le"):
        assert rows[r] == [float(k)] * len(bench.T_GRID)
