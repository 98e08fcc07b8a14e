"""racedit.train — the training loop (DiT's train.py, on the C core).

One step: a batch in a seeded order -> (t, noise) from the objective -> label dropout (CFG)
-> model forward (with the PLR target) -> diffusion loss and d loss/d out -> model backward
(adds the MoE aux-loss gradients) -> NaN/Inf check -> gradient norm and clipping -> linear
warm-up -> fused AdamW over the flat parameter buffer -> EMA. Everything numeric runs in C
(model, racedit.optim); Python never loops over parameters, tokens or experts.

A run lives in ``<results_dir>/NNN-<model>/`` (DiT's numbered folders): ``config.json``
(the settings, the racedit version and git commit), ``log.txt`` (a line per ``log_every``
steps for people: loss, images/s; checkpoints, resumptions, errors), ``log.jsonl`` (for
machines: one record per step with losses, grad norm, lr, images/s; every ``log_every``
steps, or every step with ``log_layers_every_step``, also per-block ``attn_norm`` /
``ffn_norm`` (what each branch added to the residual stream) and for MoE models per-layer
MaxVio / combination usage / dead experts / experts per token / tau and experts per token
by timestep bucket ``ept_by_t`` (the mean since the previous such record)),
``checkpoints/NNNNNNN.safetensors``, ``samples/`` and ``routing_report-NNNNNNN.{json,png}``.

Resuming from a checkpoint restores parameters, EMA, AdamW moments, routing thresholds,
step and the random generator; the data order is a function of (seed, step), so on CPU the
resumed run's losses equal the uninterrupted run's bit for bit. The log is never cut:
resuming appends ``{"event": "resume", "step": N, "from": CKPT, ...}`` and the records that
follow supersede those of steps > N written before it (:func:`read_log` returns each step's
latest record). log.jsonl is flushed and fsync'd before every checkpoint, so a checkpoint's
records survive a kill; a last line cut short by one is dropped with a warning.
"""
import dataclasses
import io
import json
import math
import os
import sys
import time

import numpy as np

from . import distributed, optim
from .checkpoint import (CheckpointError, load_checkpoint, pack_params, rng_from_state,
                         rng_state, save_checkpoint, set_thresholds, unpacked_params)
from .configs import DATA_SETTINGS, PLR_OVER_LAYERS, PRESETS, TrainConfig, get_config
from .diffusion import make_objective
from .factory import (DEVICES, PRECISIONS, build_dataset, build_model, check_device,
                      load_params, model_from_checkpoint)
from .runs import (RunLog, check_out_dir, checkpoint_path, files_after, list_checkpoints,
                   new_run_dir, read_log, repair_tail, run_folder, version_info,
                   write_config)
from .threads import thread_limit

__all__ = ["train", "TrainConfig", "TrainResult", "TrainingDiverged", "PRESETS", "build_model",
           "model_from_checkpoint", "read_log", "NUM_T_BUCKETS", "DEVICES", "PRECISIONS",
           "check_device", "run_folder", "version_info", "DATA_SETTINGS"]

NUM_T_BUCKETS = 10  # experts-per-token statistics are grouped into this many timestep bins


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf; the message names the step and the first
    parameter (in buffer order, i.e. the first layer) where it appeared."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the last checkpoint written, the per-step
    log records (each step's latest, from step 1), the trained model (live weights) and a
    copy of its EMA buffer (float32 (n,))."""

    run_dir: str
    checkpoint: str
    log: list
    model: object
    ema: np.ndarray
    config: TrainConfig
    dataset: object = None
    wall_time: float = 0.0
    report: str = None  # the routing report's JSON (MoE runs with report=True)
    rank: int = 0       # this process's rank (MPI); rank 0 wrote the run folder


# ---- models --------------------------------------------------------------------------

SHAPE_KEYS = ("depth", "hidden", "heads", "patch", "num_experts", "k", "expert_hidden")


def _base_shape(name):
    """The ModelConfig fields of a preset's model or a configs-table name; None for a name
    neither knows (then model_config must describe the whole model)."""
    if _preset_shape(name) is not None:
        return _preset_shape(name)
    try:
        c = get_config(name)
    except ValueError:
        return None
    return {k: getattr(c, k) for k in SHAPE_KEYS}


def _model_shape(name, overrides):
    """(model name, model_config) of a new run: ``overrides`` (ModelConfig fields) applied to
    the named model's shape. A changed shape gets a name that says it; expert_hidden follows
    the configs table's 4*hidden/k unless given."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(SHAPE_KEYS))
    if unknown:
        raise ValueError(f"model_config: unknown fields {unknown}; expected some of {SHAPE_KEYS}")
    base = _base_shape(name)
    if base is None:
        missing = [k for k in SHAPE_KEYS[:4] if k not in overrides]
        if missing and overrides:
            raise ValueError(f"model {name!r} is not a known config: model_config (the --depth, "
                             f"--hidden, --heads, --patch flags) needs {missing} as well")
        return name, overrides or None
    shape = {**base, **overrides}
    if overrides.get("num_experts") == 0:
        shape.update(k=0, expert_hidden=0)
    elif shape["num_experts"] and "expert_hidden" not in overrides:
        if not shape["k"]:
            raise ValueError(f"model_config: num_experts {shape['num_experts']} (--experts) "
                             f"needs k (--k), the experts per token; {name} is dense")
        if (4 * shape["hidden"]) % shape["k"]:
            raise ValueError(f"model_config: expert width 4*hidden/k = {4 * shape['hidden']}/"
                             f"{shape['k']} is not an integer; give expert_hidden (--expert-hidden)")
        shape["expert_hidden"] = 4 * shape["hidden"] // shape["k"]
    if shape == base:
        return name, _preset_shape(name)
    d, D, p = shape["depth"], shape["hidden"], shape["patch"]
    if shape["num_experts"]:
        return f"RaceDiT-{d}x{D}/{p}-{shape['k']}in{shape['num_experts']}", shape
    return f"DiT-{d}x{D}/{p}", shape


def _preset_shape(name):
    """A copy of the model_config of the preset whose model is called ``name``, or None."""
    return next((dict(p["model_config"]) for p in PRESETS.values() if p["model"] == name), None)


def _nonfinite_tensors(model, buf):
    """Names of the parameters whose slice of ``buf`` holds NaN/Inf, in buffer order (a
    Python loop over tensors, taken only on the error path)."""
    if optim.nonfinite_index(buf) < 0:
        return []
    return [name for name, off, shape in sorted(model.layout, key=lambda e: e[1])
            if optim.nonfinite_index(buf[off:off + int(np.prod(shape))]) >= 0]


# ---- the loop -------------------------------------------------------------------------

class _Trainer:
    """The training loop's state. The model owns the EMA and the AdamW moments (on its
    device); the trainer owns the data order, the random generator and the step count."""

    def __init__(self, cfg, dataset, model, run_dir, progress, out, precision="fp32",
                 world=None):
        self.cfg, self.ds, self.m, self.run_dir = cfg, dataset, model, run_dir
        self.world = world or distributed.World()
        self.device, self.precision = model.device, precision
        self.progress, self.out = progress, out
        self.obj = make_objective(cfg.objective, learn_sigma=cfg.learn_sigma)
        self.rng = np.random.default_rng([cfg.seed, 3])
        self.step = 0
        self.B = cfg.global_batch_size
        self.steps_per_epoch = len(dataset) // self.B
        if self.steps_per_epoch < 1:
            raise ValueError(f"global_batch_size {self.B} exceeds the {len(dataset)} samples")
        self.is_moe = model.config.is_moe
        self.log = None  # a RunLog: synced before every checkpoint
        self._ept = np.zeros((2, NUM_T_BUCKETS))  # experts-per-token sums / counts since the last record
        self.last_ema_routing = (None, None)  # thresholds recalibrated on the EMA, their summary

    # data order: a permutation per epoch, a pure function of (seed, epoch)
    def batch_indices(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = np.random.default_rng([self.cfg.seed, 2, epoch]).permutation(len(self.ds))
            self._perm_epoch = epoch
        return self._perm[k * self.B:(k + 1) * self.B]

    def train_step(self, layers=True):
        """One step; returns its log record, with the per-layer statistics when ``layers``.
        The MSE objectives run the model's fused step (forward, loss, backward, clip, AdamW,
        EMA in C); DiT's hybrid loss (ddpm with learn_sigma) computes its variational bound
        on the host between the model's forward / backward and its optimizer step. The
        gradient norm is always computed (an infinite max norm when not clipping: scale 1),
        so that NaN/Inf gradients stop the run before they reach the weights."""
        if self.world.size * self.cfg.grad_accum > 1:
            return distributed.accum_step(self, self.world, layers)
        cfg, m, obj = self.cfg, self.m, self.obj
        x0, y = self.ds.batch(self.batch_indices(self.step))        # (B,C,H,W), (B,)
        t, y, x_t, target = self.noised(self.rng, x0, y)
        step = self.step + 1
        lr, opt = self.opt_settings(step)
        try:
            if obj.learn_sigma and obj.name == "ddpm":
                m.zero_grad()
                out = m.forward(x_t, obj.model_time(t), y, plr_target=target if self.is_moe else None)
                diff, parts, dout = obj.loss(out, target, x0=x0, x_t=x_t, t=t)
                m.backward(dout)
                aux_total = float(m.aux_loss())
                r = m.optimizer_step(**opt) if math.isfinite(diff + aux_total) else None
            else:
                r = m.step(x_t, obj.model_time(t), y, target, return_aux=False, **opt)
                diff, aux_total = r["loss"], r["aux"]
                parts = {"mse": diff}
        except ValueError as e:  # the MoE router refuses NaN scores
            if "NaN" not in str(e):
                raise
            raise TrainingDiverged(self._where(step, f"the forward pass failed ({e})", x_t)) from None
        loss = diff + aux_total
        if not math.isfinite(loss):
            raise TrainingDiverged(self._where(step, f"loss is {loss} (diffusion {diff}, "
                                                     f"aux {aux_total})", x_t))
        gnorm = r["grad_norm"]
        if not r["updated"]:
            raise TrainingDiverged(self._where(step, f"gradient norm is {gnorm}"))
        self.step = step
        rec = {"step": step, "loss": loss, "diffusion": diff}
        rec.update({k: v for k, v in parts.items()})
        if self.is_moe:  # unweighted, averaged over layers; None where not computed
            rec.update({k: (float(v) if math.isfinite(v) else None) for k, v in m.aux().items()})
            rec["aux"] = aux_total
        rec.update({"grad_norm": gnorm, "lr": lr})
        return self._statistics(rec, t, layers)

    def noised(self, rng, x0, y):
        """(t, y, x_t, target) of a batch: flips (hflip), timesteps and noise, labels
        dropped for classifier-free guidance, drawn from ``rng`` in that order."""
        cfg, n = self.cfg, x0.shape[0]
        if cfg.hflip:
            flip = rng.random(n) < 0.5
            x0[flip] = x0[flip][..., ::-1]
        t, noise = self.obj.draw(rng, x0)
        drop = rng.random(n) < cfg.class_dropout_prob
        y = np.where(drop, self.m.num_classes, y)
        return (t, y) + tuple(self.obj.make_batch(x0, t, noise))

    def opt_settings(self, step):
        """(lr, optimizer_step's keyword arguments) of step ``step`` (1-based)."""
        cfg = self.cfg
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        return lr, dict(lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                        weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                        ema_decay=cfg.ema_decay)

    def _statistics(self, rec, t, layers):
        """Add the per-layer statistics of this step's forward to ``rec`` when ``layers``;
        experts per token by timestep bucket is counted every step and recorded (as the mean
        since the last record holding it) with them."""
        m = self.m
        if self.is_moe:
            self._ept += self.ept_counts(t)
        if not layers:
            return rec
        rec.update(_norm_record(m))
        if self.is_moe:
            rec.update(_routing_record(m))
            sums, cnt = self._ept
            rec["ept_by_t"] = {str(i): float(sums[i] / cnt[i]) for i in np.flatnonzero(cnt)}
            self._ept[:] = 0
        return rec

    def ept_counts(self, t):
        """(2, NUM_T_BUCKETS) experts-per-token sums and counts by timestep bucket of the
        last forward, whose timesteps were ``t``."""
        return _ept_by_t(self.m, self.obj.time_fraction(t))

    def diverged(self, what, x_t=None):
        """The TrainingDiverged of the step being taken (the message of :meth:`_where`)."""
        return TrainingDiverged(self._where(self.step + 1, what, x_t))

    def _where(self, step, what, x_t=None):
        """The diverged message: a non-finite parameter is the cause when there is one, then
        a non-finite input batch (the data); otherwise the tensors whose gradients are
        non-finite, first and last in buffer (= forward) order: NaN entering in the forward
        pass spreads to every later layer, one born in the backward pass to every earlier
        one."""
        m = self.m
        bad = _nonfinite_tensors(m, m.param_buffer)
        if bad:
            return (f"training diverged at step {step}: {what}; first non-finite parameter in "
                    f"{bad[0]}")
        if x_t is not None and not np.all(np.isfinite(x_t)):
            return (f"training diverged at step {step}: {what}; the input batch holds NaN/Inf "
                    f"before the first layer (x_embedder): check the data ({self.ds.source})")
        bad = _nonfinite_tensors(m, m.grad_buffer)
        if bad:
            return (f"training diverged at step {step}: {what}; first non-finite gradient in "
                    f"{bad[0]} ({len(bad)} tensors, the last being {bad[-1]})")
        return (f"training diverged at step {step}: {what}; parameters and gradients are "
                "finite (the loss overflowed; lower the learning rate or clip gradients)")

    # checkpoints
    def save(self, path):
        """Write a checkpoint (collective: rank 0 writes, with every rank's generator)."""
        m = self.m
        layout = distributed.checkpoint_meta(self.world, self.cfg, rng_state(self.rng))
        if not self.world.is_root:
            return
        ema_routing = self._ema_routing()
        log_bytes = self.log.sync() if self.log is not None else None
        opt = m.optimizer_state()
        tensors = {}
        tensors.update(pack_params(m, m.param_buffer, "model."))
        tensors.update(pack_params(m, m.ema_buffer, "ema."))
        tensors.update(pack_params(m, opt["m"], "opt.m."))
        tensors.update(pack_params(m, opt["v"], "opt.v."))
        tensors["thresholds"] = np.asarray(m.thresholds, np.float32)
        if ema_routing is not None:
            tensors["ema_thresholds"], meta_routing = ema_routing
        meta = {"step": self.step, "rng": rng_state(self.rng),
                "config": dataclasses.asdict(self.cfg),
                "model_config": dataclasses.asdict(m.config),
                "data": {"kind": self.ds.kind, "channels": self.ds.channels,
                         "image_size": self.ds.image_size, "num_classes": self.ds.num_classes,
                         "class_names": list(self.ds.class_names), "source": self.ds.source},
                "run_dir": os.path.abspath(self.run_dir), "log_bytes": log_bytes,
                "ept_window": self._ept.tolist(),
                "device": self.device, "precision": self.precision, "distributed": layout}
        if ema_routing is not None:
            meta["ema_routing"] = meta_routing
        save_checkpoint(path, tensors, meta)

    def _ema_routing(self):
        """MoE models: the thresholds recalibrated on the EMA weights and the inference
        experts per token over the sampler's grid (racedit.calibrate), said in log.txt and
        kept in the checkpoint; deterministic in (seed, step), the model left as it was."""
        if not self.is_moe:
            return None
        from .calibrate import ema_routing
        from .diffusion import default_sampler, default_steps

        cfg = self.cfg
        sampler = cfg.sampler or default_sampler(self.obj.name)
        steps = cfg.num_sampling_steps or default_steps(sampler)
        th, summary = ema_routing(self.m, self.m.ema_buffer, self.obj, self.ds, sampler, steps,
                                  seed=cfg.seed, step=self.step, batch=min(self.B, 64))
        summary["step"] = self.step
        self.last_ema_routing = (th, summary)
        if self.log is not None:
            self.log.line(f"EMA routing at step {self.step}: thresholds recalibrated on the EMA "
                          f"weights; inference experts per token over the {sampler} grid "
                          f"{summary['infer_experts_per_token']:.3f} (with the live thresholds "
                          f"{summary['infer_experts_per_token_live_thresholds']:.3f}, "
                          f"k = {summary['k']})", echo=False)
        return th, summary

    def restore(self, tensors, meta, path):
        m = self.m
        load_params(m, tensors, "model.", path)
        m.set_ema_buffer(unpacked_params(m, tensors, "ema.", path))
        m.load_optimizer_state({"m": unpacked_params(m, tensors, "opt.m.", path),
                                "v": unpacked_params(m, tensors, "opt.v.", path),
                                "step": int(meta["step"])})
        set_thresholds(m, tensors, path)
        self.step = int(meta["step"])
        self.rng = rng_from_state(distributed.rank_rng_state(meta, self.world))
        # the experts-per-token sums since the last record, so that the next record of a
        # resumed run averages the same steps as the uninterrupted run's
        window = np.asarray(meta.get("ept_window", np.zeros_like(self._ept)), np.float64)
        if window.shape != self._ept.shape:
            raise CheckpointError(f"{path}: metadata 'ept_window': expected shape "
                                  f"{self._ept.shape}, got {window.shape}")
        self._ept[...] = window

    def ckpt_path(self, step):
        return checkpoint_path(self.run_dir, step)


def _norm_record(m):
    """Per block of the last forward, the mean norm of what its attention and FFN/MoE
    branches added to the residual stream (RaceDiT.branch_norms)."""
    bn = m.branch_norms()
    return {"attn_norm": bn["attn"].tolist(), "ffn_norm": bn["ffn"].tolist()}


def _routing_record(m):
    """Per-layer routing diagnostics of the last forward."""
    stats = m.layer_stats()
    rec = {}
    for key in ("max_violation", "combination_usage", "dead_experts", "experts_per_token", "tau"):
        if stats and key in stats[0]:
            rec[key] = [_num(s[key]) for s in stats]
    if "tau" in rec:  # NaN: no thresholds (token, expert, LE choice), JSON null
        rec["tau"] = [None if v != v else v for v in rec["tau"]]
    return rec


def _ept_by_t(m, tfrac):
    """(2, NUM_T_BUCKETS): the sums and counts of the last forward's experts per token by
    timestep bucket (0 = least noise)."""
    ept = np.asarray(m.experts_per_token_by_sample(), np.float64)            # (B,)
    b = np.minimum((np.asarray(tfrac) * NUM_T_BUCKETS).astype(np.int64), NUM_T_BUCKETS - 1)
    return np.stack([np.bincount(b, weights=ept, minlength=NUM_T_BUCKETS),
                     np.bincount(b, minlength=NUM_T_BUCKETS)])


def _num(v):
    if isinstance(v, (np.ndarray, list, tuple)):
        return np.asarray(v).tolist()
    return float(v) if isinstance(v, (float, np.floating)) else int(v)


def _total_steps(cfg, n):
    if cfg.steps is not None:
        return int(cfg.steps)
    return int(cfg.epochs) * (n // cfg.global_batch_size)


# What a resumed run may change; every other setting given must equal the run's.
# results_dir: continue in a new numbered run folder there.
RESUMABLE = ("steps", "epochs", "log_every", "log_layers_every_step", "ckpt_every",
             "sample_every", "cfg_scale", "sampler", "num_sampling_steps", "results_dir",
             "grad_accum")  # grad_accum: while ranks x grad_accum stays the same


@dataclasses.dataclass
class _Job:
    """How train() was called, beyond the TrainConfig."""

    resume: str
    meta: dict              # the resumed checkpoint's metadata
    changes: dict           # resumable settings changed on resume: name -> [run's, new]
    run_dir: str            # the folder to continue in; None: a new numbered folder
    init_from: str
    dataset: object
    progress: bool
    out: object
    final_samples: bool
    report: bool
    device: str
    precision: str
    t_start: float
    world: object = None


def train(model=None, *, preset=None, resume=None, init_from=None, dataset=None,
          progress=None, out=None, final_samples=True, report=True, device=None,
          precision=None, threads=None, **kwargs):
    """Train a RaceDiT (or dense DiT) and return a :class:`TrainResult`.

    ``model``: a config name (default TrainConfig.model, ``"RaceDiT-S/2-2in8"``) or a
    preset's model name; ``model_config=`` changes its shape (see :class:`TrainConfig`).

    Keyword arguments are :class:`TrainConfig` fields (``steps=``, ``global_batch_size=``,
    ``objective=``, ``routing=``, ``data=``/``data_path=`` ...). ``preset`` ("quick",
    "tiny") fills in a tested set of fields first; explicit arguments override it.
    ``resume``: a checkpoint path; training continues with that run's settings,
    bit-exactly. Only the settings in RESUMABLE (steps/epochs, the cadences, the sample
    grids' settings) may change; any other one given must equal the run's. The run goes on
    in the checkpoint's run folder (``<run>/checkpoints/``), appending to its logs, or with
    ``results_dir`` in a new numbered folder there (needed for a checkpoint kept elsewhere).
    ``init_from``: a checkpoint whose weights (the live ones, not the EMA) start a new run
    (fine-tuning; fresh optimiser state). ``dataset``: an ArrayDataset to use instead of
    loading ``data``. progress: a tqdm bar (None: when stderr is a terminal); out: a stream
    for messages (stdout; log.txt gets them too). final_samples: write a sample grid at the
    end; report: write the routing report (MoE models). threads: limit the OpenMP and BLAS
    threads (racedit.threads.thread_limit).
    device: "cpu" or "cuda" (the whole step on the GPU: racedit.RaceDiT(device="cuda"));
    precision: "fp32", or on cuda "tf32" (TF32 GEMMs) or "bf16" (bf16 operands and fp32
    accumulation in every linear layer, the attention and the expert GEMMs, with fp32
    master weights; the routers' small GEMMs in TF32). Both default to "cpu"/"fp32" for a new run and to
    the checkpoint's for ``resume``; checkpoints are the same on either device (a GPU
    run resumes on the CPU and vice versa, bit-exactly only on the same device).

    Under an MPI launcher (``mpirun -n N``) the N ranks train one model, data parallel:
    each step's ``global_batch_size`` samples are split into N x ``grad_accum`` micro-batches
    whose gradients are averaged (racedit.distributed, docs/distributed.md); rank 0 writes
    the run folder and an error on any rank ends every rank.

    Raises ValueError for bad settings or data (racedit.data.DataError names the file), an
    output folder that cannot be written, or device "cuda" when CUDA is not available,
    before the first step; OSError when writing fails later (a full disk); and
    TrainingDiverged when the loss or a gradient turns NaN/Inf.
    """
    world = distributed.world()
    with world.guard(), thread_limit(threads):
        return _start(model, preset, resume, init_from, dataset, progress, out, final_samples,
                      report, device, precision, kwargs)


def _start(model, preset, resume, init_from, dataset, progress, out, final_samples, report,
           device, precision, kwargs):
    out = out or sys.stdout
    t_start = time.time()
    world = distributed.world()
    if not world.is_root:
        out, progress = io.StringIO(), False
    meta = load_checkpoint(resume)[1] if resume is not None else None
    cfg, changes = _resolve_config(model, preset, meta, kwargs)
    _validate(cfg)
    distributed.micro_layout(cfg.global_batch_size, world.size, cfg.grad_accum)
    if meta is not None:
        distributed.check_resume(meta, cfg, world, resume)
    run_dir = _output_folder(cfg, resume, kwargs.get("results_dir"))
    inherited = resume is not None and device is None
    if inherited:
        device = meta.get("device", "cpu")
        precision = precision or meta.get("precision", "fp32")
    device = device or "cpu"
    precision = precision or "fp32"
    try:
        check_device(device, precision)
    except ValueError as e:
        if not inherited:
            raise
        raise ValueError(f"{e}; {resume} comes from a {device} ({precision}) run: pass "
                         "device='cpu' (--device cpu) to resume it on the CPU") from None
    distributed.select_device(world, device)
    if progress is None:
        progress = sys.stderr.isatty()
    job = _Job(resume, meta, changes, run_dir, init_from, dataset, progress, out,
               final_samples, report, device, precision, t_start, world)
    from .cuda import precision_scope

    with precision_scope(device, precision):
        return _train(cfg, job)


def _output_folder(cfg, resume, results_dir):
    """The run folder a resumed run continues in (None: a new numbered one in
    cfg.results_dir), after checking that the output can be written."""
    if resume is None or results_dir is not None:
        check_out_dir(cfg.results_dir, "results_dir (--results-dir)")
        return None
    run = run_folder(resume)
    if run is None:
        raise ValueError(f"resume: {resume} is not in a run folder (<run>/checkpoints/ with "
                         "<run>/config.json); give --results-dir DIR (results_dir=) to continue "
                         "it in a new numbered run folder there")
    check_out_dir(run, "resume")
    return run


def _train(cfg, job):
    ds = build_dataset(cfg, job.dataset)
    total = _total_steps(cfg, len(ds))
    m = build_model(cfg, ds.channels, ds.image_size, ds.num_classes, job.device, job.precision)
    root = job.world.is_root
    run_dir = job.world.bcast(job.run_dir or (new_run_dir(cfg.results_dir, m.config.name)
                                              if root else None))
    tr = _Trainer(cfg, ds, m, run_dir, job.progress, job.out, job.precision, job.world)
    records, notes = [], []
    if job.resume is not None:
        tensors, _ = load_checkpoint(job.resume)
        tr.restore(tensors, job.meta, job.resume)
        if root:
            records, notes = _resume_history(tr, job)
    elif job.init_from is not None:
        tensors, _ = load_checkpoint(job.init_from)
        load_params(m, tensors, "model.", job.init_from)
        set_thresholds(m, tensors, job.init_from)
        m.set_ema_buffer(m.param_buffer)
    tr.log = log = RunLog(run_dir, job.out) if root else distributed.NullLog()
    try:
        if job.resume is not None:
            _log_resume(tr, job, notes)
        if root:
            write_config(run_dir, cfg)
        on = f" on {job.device} ({job.precision})" if job.device != "cpu" else ""
        log.line(f"{m.config.name}, {m.num_params():,} parameters "
                 f"({m.num_activated_params():,} activated), data {ds!r}, {total} steps of "
                 f"{cfg.global_batch_size}{on} -> {run_dir}")
        _loop(tr, total, records, log)
        return _finish(tr, job, records, log)
    except KeyboardInterrupt:
        _last_words(log, f"interrupted at step {tr.step}; {_resume_hint(tr)}", job.out)
        raise
    except Exception as e:
        _last_words(log, f"stopped at step {tr.step}: {type(e).__name__}: {e}", None)
        raise
    finally:
        log.close()


def _finish(tr, job, records, log):
    """The last checkpoint, the sample grid and the routing report of a finished run."""
    cfg, m, run_dir = tr.cfg, tr.m, tr.run_dir
    last_ckpt = tr.ckpt_path(tr.step)
    tr.save(last_ckpt)
    log.line(f"saved {last_ckpt}")
    root = tr.world.is_root
    if job.final_samples and root:
        p = os.path.join(run_dir, "samples", f"{tr.step:07d}.png")
        _sample_grid(tr, p, 8, progress=job.progress)
        log.line(f"sample grid {p}")
    rep = None
    if job.report and m.config.is_moe and root:
        from .report import routing_report

        th, summary = tr.last_ema_routing
        rep = routing_report(m, m.ema_buffer, tr.obj, tr.ds, records, run_dir, seed=cfg.seed,
                             step=tr.step, thresholds=th, ema_routing=summary)
        log.line(f"routing report {rep['json']} and {rep['png']}"
                 + (" (replacing the earlier report of this step)" if rep["replaced"] else ""))
    wall = time.time() - job.t_start
    log.line(f"done at step {tr.step} in {wall:.1f} s", echo=False)
    return TrainResult(run_dir, last_ckpt, records, m, np.array(m.ema_buffer), cfg, tr.ds, wall,
                       rep and rep["json"], tr.world.rank)


def _last_words(log, msg, out):
    """A last log.txt line (echoed to ``out`` when given) that never hides the error that
    ended the run (writing may be what failed)."""
    try:
        log.line(msg, echo=False)
    except OSError:
        pass
    if out is not None:
        print(f"racedit: {msg}", file=out)


def _resume_hint(tr):
    """The run's checkpoint of the highest step reached (a resumed run's folder may hold
    later ones, written before) and how to continue from it."""
    done = [p for s, p in list_checkpoints(os.path.join(tr.run_dir, "checkpoints"))
            if s <= tr.step]
    if not done:
        return "no checkpoint written yet"
    return f"the latest checkpoint is {done[-1]} (continue with --resume {done[-1]})"


# ---- resuming -------------------------------------------------------------------------

def _resume_history(tr, job):
    """(records of steps <= N as the checkpoint's log holds them, notes for the log). In
    the run's own folder the log's torn tail is cut first; a new run folder gets those
    records copied into its log.jsonl. The notes say what the resumed run will supersede
    or replace (records, checkpoints, sample grids of steps > N) and what is missing."""
    n, notes = tr.step, []
    src_run = run_folder(job.resume)
    src = os.path.join(src_run, "log.jsonl") if src_run else None
    same = job.run_dir is not None
    if same:
        repair_tail(src, job.out)
    recs = read_log(src, upto_step=n, upto_bytes=job.meta.get("log_bytes"),
                    out=job.out) if src else []
    if same:
        later = [r["step"] for r in read_log(src, out=io.StringIO()) if r["step"] > n]
        if later:
            notes.append(f"log.jsonl keeps the records of steps {later[0]}-{later[-1]} written "
                         f"before; the records from step {n + 1} on supersede them")
        files = files_after(tr.run_dir, n)
        if files:
            notes.append(f"{files} of the earlier run will be replaced as the run reaches "
                         "their steps")
    else:
        with open(os.path.join(tr.run_dir, "log.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        notes.append(f"copied the log records of steps 1-{n} from {src}" if src else
                     f"{job.resume} has no run folder: the log starts at step {n + 1}")
    have = recs[-1]["step"] if recs else 0
    if src and have < n:
        notes.append(f"warning: the log holds records up to step {have} only")
    return recs, notes


def _log_resume(tr, job, notes):
    tr.log.record({"event": "resume", "step": tr.step, "from": os.path.abspath(job.resume),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": job.changes})
    changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in job.changes.items())
    tr.log.line(f"resumed {tr.run_dir} at step {tr.step} from {job.resume}"
                + (f"; changed: {changed}" if changed else ""))
    for note in notes:
        tr.log.line(note)


# Command-line spellings of TrainConfig / ModelConfig fields, for messages.
_FLAGS = {"beta": "--threshold-beta", "data_path": "--data", "num_experts": "--experts"}


def _flag(key):
    return _FLAGS.get(key, "--" + key.replace("_", "-"))


def _check_unknown(kwargs):
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train: unknown settings {unknown}; see racedit.TrainConfig")


def _resolve_config(model, preset, meta, kwargs):
    """(TrainConfig, changes) of a new run (preset, then model, then explicit settings) or
    of a resumed one (:func:`_resume_config`)."""
    _check_unknown(kwargs)
    if meta is not None:
        return _resume_config(model, preset, meta, kwargs)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    fields = dict(PRESETS[preset]) if preset else {}
    if model is not None:
        if model != fields.get("model"):
            fields.pop("model_config", None)  # the preset's sizes belong to its model
        fields["model"] = model
    if kwargs.get("epochs") is not None and kwargs.get("steps") is None:
        fields.pop("steps", None)  # the epochs asked for, not the preset's steps
    fields.update({k: v for k, v in kwargs.items() if v is not None})
    fields["model"], fields["model_config"] = _model_shape(
        fields.get("model", TrainConfig.model), fields.get("model_config"))
    return TrainConfig(**fields), {}


def _resume_config(model, preset, meta, kwargs):
    """The checkpoint's TrainConfig with the RESUMABLE settings given applied, and those
    changes; ValueError listing every other setting given that differs from the run's."""
    fields = dict(meta["config"])
    clash = [f"preset {preset!r} (--preset) was given"] if preset is not None else []
    if model is not None and model != fields["model"]:
        clash.append(_differs("model", model, fields["model"]))
    shape = dataclasses.asdict(TrainConfig.from_dict(fields).to_model_config())
    clash += [_differs(k, v, shape.get(k)) for k, v in (kwargs.get("model_config") or {}).items()
              if shape.get(k) != v]
    changes = {}
    for k, v in kwargs.items():
        if v is None or k == "model_config" or fields.get(k) == v:
            continue
        if k in RESUMABLE:
            changes[k] = [fields.get(k), v]
            fields[k] = v
        else:
            clash.append(_differs(k, v, fields.get(k)))
    if clash:
        raise ValueError("resume: a resumed run keeps its settings, but " + "; ".join(clash)
                         + ". Only " + ", ".join(_flag(k) for k in RESUMABLE) + " may change; "
                         "to train on with other settings start a new run from the "
                         "checkpoint's weights (--ckpt CKPT, init_from=)")
    if kwargs.get("steps") is not None and fields.get("epochs") is not None:
        changes["epochs"] = [fields["epochs"], None]
        fields["epochs"] = None
    return TrainConfig.from_dict(fields), changes


def _differs(key, value, run_value):
    return f"{key} {value!r} ({_flag(key)}) differs from the run's {run_value!r}"


def _loop(tr, total, records, log):
    """Steps until ``total``: a log.jsonl record per step (per-layer statistics every
    log_every steps and at the end, or every step), a summary every log_every steps (log.txt
    and the bar's postfix, or a printed line), checkpoints and sample grids on cadence."""
    cfg = tr.cfg
    bar = _bar(tr.progress, total, tr.step)
    window = []
    try:
        while tr.step < total:
            nxt = tr.step + 1
            layers = cfg.log_layers_every_step or nxt % cfg.log_every == 0 or nxt == total
            t0 = time.perf_counter()
            rec = tr.train_step(layers)
            rec["images_per_s"] = cfg.global_batch_size / max(time.perf_counter() - t0, 1e-9)
            log.record(rec)
            records.append(rec)
            window.append(rec)
            if bar is not None:
                bar.update(1)
            if tr.step % cfg.log_every == 0 or tr.step == total:
                msg = _summary(window)
                window = []
                log.line(f"step {tr.step}/{total}: {msg}", echo=False)
                if bar is not None:
                    bar.set_postfix_str(msg)
                else:
                    print(f"step {tr.step:7d} {msg}", file=tr.out)
                log.flush()
            if cfg.ckpt_every and tr.step % cfg.ckpt_every == 0 and tr.step < total:
                tr.save(tr.ckpt_path(tr.step))
                log.line(f"saved {tr.ckpt_path(tr.step)}", echo=False)
            if (cfg.sample_every and tr.step % cfg.sample_every == 0 and tr.step < total
                    and tr.world.is_root):
                _sample_grid(tr, os.path.join(tr.run_dir, "samples", f"{tr.step:07d}.png"), 4)
    finally:
        if bar is not None:
            bar.close()


def _validate(cfg):
    if cfg.steps is None and cfg.epochs is None:
        raise ValueError("give --steps N or --epochs N (steps= or epochs= in Python): the "
                         "run has no length")
    if cfg.global_batch_size < 1:
        raise ValueError(f"global_batch_size: expected >= 1, got {cfg.global_batch_size}")
    if cfg.steps is not None and cfg.steps < 0:
        raise ValueError(f"steps: expected >= 0, got {cfg.steps}")
    if cfg.epochs is not None and cfg.epochs < 0:
        raise ValueError(f"epochs: expected >= 0, got {cfg.epochs}")
    if cfg.objective not in ("ddpm", "flow"):
        raise ValueError(f"objective: expected 'ddpm' or 'flow', got {cfg.objective!r}")
    if cfg.data not in DATA_SETTINGS:
        raise ValueError(f"data: expected one of {tuple(DATA_SETTINGS)}, got {cfg.data!r}")
    if cfg.plr_over_layers not in PLR_OVER_LAYERS:
        raise ValueError(f"plr_over_layers (--plr-over-layers): expected one of "
                         f"{PLR_OVER_LAYERS}, got {cfg.plr_over_layers!r}")
    for k in ("lr", "weight_decay", "grad_clip", "plr_weight", "sim_weight", "balance_weight"):
        v = getattr(cfg, k)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{k}: expected a finite value >= 0, got {v}")
    if not 0 <= cfg.ema_decay <= 1:
        raise ValueError(f"ema_decay: expected a value in [0, 1], got {cfg.ema_decay}")
    if not 0 <= cfg.class_dropout_prob <= 1:
        raise ValueError(f"class_dropout_prob: expected a value in [0, 1], got {cfg.class_dropout_prob}")
    for k in ("log_every",):
        if getattr(cfg, k) < 1:
            raise ValueError(f"{k}: expected >= 1, got {getattr(cfg, k)}")
    for k in ("ckpt_every", "sample_every", "warmup_steps"):
        if getattr(cfg, k) < 0:
            raise ValueError(f"{k}: expected >= 0, got {getattr(cfg, k)}")
    _validate_sampling(cfg)
    _validate_data(cfg)


def _validate_sampling(cfg):
    """The sample grids' settings, checked before training rather than after it."""
    from .diffusion import SAMPLERS

    if not (math.isfinite(cfg.cfg_scale) and cfg.cfg_scale >= 0):
        raise ValueError(f"cfg_scale (--cfg-scale): expected a finite value >= 0, got {cfg.cfg_scale}")
    if cfg.num_sampling_steps is not None and cfg.num_sampling_steps < 1:
        raise ValueError(f"num_sampling_steps (--num-sampling-steps): expected >= 1, got "
                         f"{cfg.num_sampling_steps}")
    if cfg.sampler is not None and cfg.sampler not in SAMPLERS[cfg.objective]:
        raise ValueError(f"sampler (--sampler): a {cfg.objective} model samples with "
                         f"{SAMPLERS[cfg.objective]}, got {cfg.sampler!r}")


def _validate_data(cfg):
    if cfg.channels not in (None, 1, 3):
        raise ValueError(f"channels (--channels): expected 1 or 3, got {cfg.channels}")
    for k in ("image_size", "num_samples", "num_classes"):
        v = getattr(cfg, k)
        if v is not None and v < 1:
            raise ValueError(f"{k} ({_flag(k)}): expected >= 1, got {v}")


def _summary(window):
    keys = ("loss", "diffusion", "plr", "sim", "balance")
    parts = [f"{k} {np.mean([r[k] for r in window]):.4f}" for k in keys
             if window[-1].get(k) is not None]
    if "max_violation" in window[-1]:
        parts.append(f"maxvio {np.mean(window[-1]['max_violation']):.2f}")
    parts.append(f"{np.mean([r['images_per_s'] for r in window]):.1f} img/s")
    return ", ".join(parts)


def _bar(progress, total, start):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _sample_grid(tr, path, per_class, progress=False):
    """Sample ``per_class`` images of each class (up to 10 classes) with the EMA weights
    and write a grid (one row per class)."""
    from .calibrate import routing_with
    from .sample import generate, save_grid

    ncls = min(tr.ds.num_classes, 10)
    labels = np.repeat(np.arange(ncls), per_class)
    cfg, m = tr.cfg, tr.m
    th, summary = tr.last_ema_routing   # the EMA's thresholds when this step's checkpoint has them
    th = th if summary is not None and summary["step"] == tr.step else None
    with routing_with(m, thresholds=th, training=m.training):
        x = generate(m, tr.obj, labels, weights=m.ema_buffer, cfg_scale=cfg.cfg_scale,
                     sampler=cfg.sampler, num_steps=cfg.num_sampling_steps, seed=cfg.seed,
                     clip_denoised=tr.ds.kind == "pixels", progress=progress)
    if tr.ds.kind == "pixels":
        save_grid(x, path, ncol=per_class)
    else:
        np.save(path.replace(".png", ".npy"), x)
