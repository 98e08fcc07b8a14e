"""racedit.train — the training loop (DiT's train.py, on the C core).

One step: a batch in a seeded order -> (t, noise) from the objective -> label dropout (CFG)
-> model forward (with the PLR target) -> diffusion loss and d loss/d out -> model backward
(adds the MoE aux-loss gradients) -> NaN/Inf check -> gradient norm and clipping -> linear
warm-up -> fused AdamW over the flat parameter buffer -> EMA. Everything numeric runs in C
(model, racedit.optim); Python never loops over parameters, tokens or experts.

A run lives in ``<results_dir>/NNN-<model>/`` (DiT's numbered folders): ``config.json``,
``log.jsonl`` (one record per step: losses, grad norm, lr, per-block ``attn_norm`` /
``ffn_norm`` (what each branch added to the residual stream), for MoE models the aux
losses, per-layer MaxVio / combination usage / dead experts / experts per token / tau and
experts per token by timestep bucket ``ept_by_t``; images/s),
``checkpoints/NNNNNNN.safetensors``, ``samples/``.
Resuming from a checkpoint restores parameters, EMA, AdamW moments, routing thresholds,
step and the random generator; the data order is a function of (seed, step), so on CPU the
resumed run's losses equal the uninterrupted run's bit for bit.
"""
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np

from . import optim
from .checkpoint import load_checkpoint, rng_from_state, rng_state, save_checkpoint
from .data import ArrayDataset, load_data
from .diffusion import make_objective

__all__ = ["train", "TrainConfig", "TrainResult", "TrainingDiverged", "PRESETS", "build_model",
           "model_from_checkpoint", "NUM_T_BUCKETS", "DEVICES", "PRECISIONS"]

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")  # tf32 / bf16: cuda only

NUM_T_BUCKETS = 10  # experts-per-token statistics are grouped into this many timestep bins


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf; the message names the step and the first
    parameter (in buffer order, i.e. the first layer) where it appeared."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run (saved as config.json and in each checkpoint).

    model: a name from racedit.configs (``"RaceDiT-S/2-2in8"``, ``"DiT-S/2"``, ...);
    model_config: optional dict of ModelConfig fields overriding the named one (presets use
    it for sizes between the table's); data: one of racedit.data.DATA_KINDS with data_path;
    steps or epochs (steps wins; an epoch is len(data) // global_batch_size steps);
    grad_clip <= 0 disables clipping; warmup_steps: linear lr warm-up; the rest as DiT.
    """

    model: str = "RaceDiT-S/2-2in8"
    model_config: dict = None
    data: str = "builtin"
    data_path: str = None
    num_samples: int = 10000
    image_size: int = 32
    num_classes: int = None
    objective: str = "ddpm"
    learn_sigma: bool = False
    routing: str = "race"
    gating: str = "identity"
    plr_weight: float = 1.0
    sim_weight: float = 0.01
    balance_weight: float = 0.0
    beta: float = 0.99
    global_batch_size: int = 32
    steps: int = None
    epochs: int = None
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    class_dropout_prob: float = 0.1
    hflip: bool = False
    seed: int = 0
    results_dir: str = "results"
    ckpt_every: int = 0
    log_every: int = 100
    sample_every: int = 0
    cfg_scale: float = 4.0
    sampler: str = None
    num_sampling_steps: int = None


# Sizes between the configs table's T and S, for CPU-scale runs. "quick": a 4-block
# RaceDiT (D=128, patch 4, 8 experts, 2 per token on average, 1.35M activated parameters)
# trained with rectified flow for 4000 steps of 32 built-in shapes: about 6 minutes on 2
# cores (about 360 images/s, 12 CPU-minutes), after which the sample grid shows the
# classes. "tiny": seconds, for smoke tests and the notebook.
PRESETS = {
    "quick": dict(
        model="RaceDiT-quick/4-2in8",
        model_config=dict(depth=4, hidden=128, heads=4, patch=4, num_experts=8, k=2,
                          expert_hidden=256),
        objective="flow", global_batch_size=32, steps=4000, lr=2e-3, warmup_steps=100,
        grad_clip=1.0, ema_decay=0.995, log_every=50, ckpt_every=1000, sample_every=0,
        num_samples=10000, cfg_scale=4.0, sampler="heun", num_sampling_steps=20),
    "tiny": dict(
        model="RaceDiT-tiny/4-2in4",
        model_config=dict(depth=2, hidden=32, heads=2, patch=4, num_experts=4, k=2,
                          expert_hidden=64),
        objective="flow", global_batch_size=8, steps=20, lr=1e-3, ema_decay=0.9,
        log_every=5, num_samples=200, sampler="euler", num_sampling_steps=4),
}


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the last checkpoint written, the per-step
    log records, the trained model (live weights) and its EMA buffer (float32 (n,))."""

    run_dir: str
    checkpoint: str
    log: list
    model: object
    ema: np.ndarray
    config: TrainConfig
    dataset: object = None
    wall_time: float = 0.0


# ---- models --------------------------------------------------------------------------

def _model_config(cfg):
    from .configs import ModelConfig, get_config

    if cfg.model_config:
        return ModelConfig(name=cfg.model, **cfg.model_config)
    return get_config(cfg.model)


def check_device(device, precision):
    """Validate a (device, precision) pair: ValueError for an unknown one, a reduced
    precision on the CPU, or ``device="cuda"`` (the ``--device cuda`` flag) when CUDA is
    not available, saying why (racedit built without CUDA, or no usable device)."""
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if device == "cpu" and precision != "fp32":
        raise ValueError(f"precision {precision!r} (--precision) needs device 'cuda' "
                         "(--device cuda); the CPU trains in fp32")
    if device == "cuda":
        try:
            _require_cuda()
        except RuntimeError as e:
            raise ValueError(f"device 'cuda' (--device cuda): {e}") from None


def _require_cuda():
    """RuntimeError saying why CUDA is not available (built without it, or no device)."""
    from .cuda import _require

    _require()


def _new_model(device, precision, *args, **kwargs):
    """RaceDiT on ``device``; the CUDA model's GEMMs are bf16 for precision "bf16"."""
    from .model import RaceDiT

    if device == "cuda":
        return RaceDiT(*args, device="cuda", dtype="bf16" if precision == "bf16" else "fp32",
                       **kwargs)
    return RaceDiT(*args, **kwargs)


def _on_device(m):
    return getattr(m, "device", "cpu") == "cuda"


def build_model(cfg, in_channels, input_size, num_classes, device="cpu", precision="fp32"):
    """The RaceDiT that TrainConfig ``cfg`` describes (labels are dropped by the trainer,
    so the model's own dropout is off), on ``device`` ("cpu" | "cuda"; see
    :func:`check_device`) with ``precision`` ("fp32"; on cuda also "tf32" | "bf16")."""
    check_device(device, precision)
    return _new_model(device, precision, _model_config(cfg), input_size=input_size,
                      in_channels=in_channels, num_classes=num_classes, seed=cfg.seed,
                      learn_sigma=cfg.learn_sigma, routing=cfg.routing, gating=cfg.gating,
                      plr_weight=cfg.plr_weight, sim_weight=cfg.sim_weight,
                      balance_weight=cfg.balance_weight, beta=cfg.beta, class_dropout_prob=0.0)


def _load_params(m, tensors, prefix, path):
    """Set ``m``'s parameters from the checkpoint's ``<prefix><name>`` tensors (uploaded
    when ``m`` lives on the GPU)."""
    if _on_device(m):
        buf = np.empty(m.num_params(), np.float32)
        _unpack(m, tensors, prefix, buf, path)
        m.set_param_buffer(buf)
    else:
        _unpack(m, tensors, prefix, m.param_buffer, path)


def model_from_checkpoint(path, use_ema=True, device="cpu", precision="fp32"):
    """(model, meta) rebuilt from a training checkpoint (written on either device) on
    ``device``; the weights are the EMA's unless use_ema is False. The routing thresholds
    are restored too. CheckpointError (naming the file) when its contents (checked by
    load_checkpoint) do not describe a model, or its tensors do not fit that model."""
    from .checkpoint import CheckpointError

    tensors, meta = load_checkpoint(path)
    check_device(device, precision)
    cfg = _config_from_dict(meta["config"])
    d = meta["data"]
    try:
        m = build_model(cfg, d["channels"], d["image_size"], d["num_classes"], device, precision)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config does not build a model ({e})") from None
    _load_params(m, tensors, "ema." if use_ema else "model.", path)
    _set_thresholds(m, tensors, path)
    return m, meta


def _config_from_dict(d):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in fields})


def _pack(model, buf, prefix):
    """Named views of a flat buffer laid out like model.param_buffer (model.layout)."""
    return {prefix + name: buf[off:off + int(np.prod(shape))].reshape(shape)
            for name, off, shape in model.layout}


def _unpack(model, tensors, prefix, buf, path):
    """Fill flat ``buf`` from the checkpoint's ``<prefix><name>`` tensors."""
    from .checkpoint import CheckpointError

    for name, off, shape in model.layout:
        key = prefix + name
        if key not in tensors:
            raise CheckpointError(f"{path}: checkpoint has no tensor {key!r} (another model?)")
        a = tensors[key]
        if a.shape != tuple(shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {a.shape}, the model "
                                  f"expects {tuple(shape)}")
        buf[off:off + a.size] = a.reshape(-1)


def _nonfinite_tensors(model, buf):
    """Names of the parameters whose slice of ``buf`` holds NaN/Inf, in buffer order (a
    Python loop over tensors, taken only on the error path)."""
    if optim.nonfinite_index(buf) < 0:
        return []
    return [name for name, off, shape in sorted(model.layout, key=lambda e: e[1])
            if optim.nonfinite_index(buf[off:off + int(np.prod(shape))]) >= 0]


# ---- run folders ----------------------------------------------------------------------

def _new_run_dir(results_dir, model_name):
    os.makedirs(results_dir, exist_ok=True)
    idx = [int(m.group(1)) for m in (re.match(r"^(\d+)-", n) for n in os.listdir(results_dir)) if m]
    run = os.path.join(results_dir, f"{(max(idx) + 1) if idx else 0:03d}-{model_name.replace('/', '-')}")
    os.makedirs(os.path.join(run, "checkpoints"))
    os.makedirs(os.path.join(run, "samples"))
    return run


# ---- the loop -------------------------------------------------------------------------

class _Trainer:
    def __init__(self, cfg, dataset, model, run_dir, progress, out, precision="fp32"):
        self.cfg, self.ds, self.m, self.run_dir = cfg, dataset, model, run_dir
        self.device, self.precision = ("cuda" if _on_device(model) else "cpu"), precision
        self.progress, self.out = progress, out
        self.obj = make_objective(cfg.objective, learn_sigma=cfg.learn_sigma)
        n = model.param_buffer.size
        self.ema = model.param_buffer.copy()
        self.adam_m = np.zeros(n, np.float32)
        self.adam_v = np.zeros(n, np.float32)
        self.rng = np.random.default_rng([cfg.seed, 3])
        self.step = 0
        self.B = cfg.global_batch_size
        self.steps_per_epoch = len(dataset) // self.B
        if self.steps_per_epoch < 1:
            raise ValueError(f"global_batch_size {self.B} exceeds the {len(dataset)} samples")
        self.is_moe = model.config.is_moe

    # data order: a permutation per epoch, a pure function of (seed, epoch)
    def batch_indices(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = np.random.default_rng([self.cfg.seed, 2, epoch]).permutation(len(self.ds))
            self._perm_epoch = epoch
        return self._perm[k * self.B:(k + 1) * self.B]

    def train_step(self):
        cfg, m, obj = self.cfg, self.m, self.obj
        x0, y = self.ds.batch(self.batch_indices(self.step))        # (B,C,H,W), (B,)
        if cfg.hflip:
            flip = self.rng.random(self.B) < 0.5
            x0[flip] = x0[flip][..., ::-1]
        t, noise = obj.draw(self.rng, x0)
        drop = self.rng.random(self.B) < cfg.class_dropout_prob
        y = np.where(drop, m.num_classes, y)
        x_t, target = obj.make_batch(x0, t, noise)
        if self.device == "cuda":
            return self._device_step(x0, y, t, x_t, target)
        m.zero_grad()
        step = self.step + 1
        try:
            out = m.forward(x_t, obj.model_time(t), y, plr_target=target if self.is_moe else None)
        except ValueError as e:  # the MoE router refuses NaN scores
            if "NaN" not in str(e):
                raise
            raise TrainingDiverged(self._where(step, f"the forward pass failed ({e})", x_t)) from None
        diff, parts, dout = obj.loss(out, target, x0=x0, x_t=x_t, t=t)
        m.backward(dout)
        aux_total = float(m.aux_loss())
        loss = diff + aux_total
        if not math.isfinite(loss):
            raise TrainingDiverged(self._where(step, f"loss is {loss} (diffusion {diff}, "
                                                     f"aux {aux_total})", x_t))
        gnorm = optim.grad_norm(m.grad_buffer)
        if not math.isfinite(gnorm):
            raise TrainingDiverged(self._where(step, f"gradient norm is {gnorm}"))
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        optim.adamw_step(m.param_buffer, m.grad_buffer, self.adam_m, self.adam_v, lr=lr,
                         step=step, beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps,
                         weight_decay=cfg.weight_decay,
                         grad_scale=optim.clip_scale(gnorm, cfg.grad_clip))
        optim.ema_update(self.ema, m.param_buffer, cfg.ema_decay)
        self.step = step
        rec = {"step": step, "loss": loss, "diffusion": diff}
        rec.update({k: v for k, v in parts.items()})
        if self.is_moe:  # unweighted, averaged over layers; None where not computed
            rec.update({k: (float(v) if math.isfinite(v) else None) for k, v in m.aux().items()})
            rec["aux"] = aux_total
        rec.update({"grad_norm": gnorm, "lr": lr})
        rec.update(_norm_record(m))
        if self.is_moe:
            rec.update(_routing_record(m, obj.time_fraction(t)))
        return rec

    def _device_step(self, x0, y, t, x_t, target):
        """train_step on the GPU: the whole step runs on the device (CudaRaceDiT.step) and
        only scalars come back; DiT's hybrid loss (ddpm + learn_sigma), whose VLB term is
        computed on the host, goes forward -> loss -> backward(dout) -> optimizer_step.
        Without clipping the step still asks the device for the gradient norm (an infinite
        max norm: scale 1, as on the CPU) so that NaN/Inf gradients stop the run before
        they reach the weights."""
        cfg, m, obj = self.cfg, self.m, self.obj
        step = self.step + 1
        lr = cfg.lr * min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else cfg.lr
        opt = dict(lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                   weight_decay=cfg.weight_decay,
                   max_grad_norm=cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                   ema_decay=cfg.ema_decay)
        mt = obj.model_time(t)
        plr_target = target if self.is_moe else None
        try:
            if obj.learn_sigma and obj.name == "ddpm":
                m.zero_grad()
                out = m.forward(x_t, mt, y, plr_target=plr_target)
                diff, parts, dout = obj.loss(out, target, x0=x0, x_t=x_t, t=t)
                m.backward(dout)
                aux_total = float(m.aux_loss()) if self.is_moe else 0.0
                aux = m.aux() if self.is_moe else {}
                loss = diff + aux_total
                if not math.isfinite(loss):
                    raise TrainingDiverged(self._where(step, f"loss is {loss} (diffusion {diff}, "
                                                             f"aux {aux_total})", x_t))
                r = m.optimizer_step(**opt)
            else:
                r = m.step(x_t, mt, y, target, return_aux=self.is_moe, **opt)
                diff = float(r["loss"])
                parts = {"mse": diff}
                aux_total = float(r.get("aux_loss", 0.0))
                aux = {k: r[k] for k in ("plr", "sim", "balance") if k in r}
                loss = diff + aux_total
        except ValueError as e:  # NaN routing scores, or a non-finite gradient norm
            msg = str(e)
            if "NaN" not in msg and "non-finite" not in msg:
                raise
            what = ("gradient norm is not finite" if "gradient norm" in msg
                    else f"the forward pass failed ({msg})")
            raise TrainingDiverged(self._where(step, f"{what} (on the device)", x_t)) from None
        if not math.isfinite(loss):
            raise TrainingDiverged(self._where(step, f"loss is {loss} (diffusion {diff}, "
                                                     f"aux {aux_total}) (on the device)", x_t))
        gnorm = r["grad_norm"]
        self.step = step
        rec = {"step": step, "loss": loss, "diffusion": diff}
        rec.update(parts)
        if self.is_moe:
            rec.update({k: (float(v) if math.isfinite(v) else None) for k, v in aux.items()})
            rec["aux"] = aux_total
        rec.update({"grad_norm": None if gnorm is None else float(gnorm), "lr": lr})
        rec.update(_norm_record(m))
        if self.is_moe:
            rec.update(_routing_record(m, obj.time_fraction(t)))
        return rec

    def sync_host(self):
        """GPU runs: copy the device EMA and AdamW moments into the host arrays (``ema``,
        ``adam_m``, ``adam_v``) that checkpoints, sampling and the result use."""
        if self.device == "cuda":
            self.ema = self.m.ema_buffer
            st = self.m.optimizer_state()
            self.adam_m, self.adam_v = st["m"], st["v"]

    def push_device(self):
        """GPU runs: upload the host EMA, AdamW moments and step (after a restore)."""
        if self.device == "cuda":
            self.m.set_ema_buffer(self.ema)
            self.m.load_optimizer_state({"m": self.adam_m, "v": self.adam_v, "step": self.step})

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
        m = self.m
        self.sync_host()
        tensors = {}
        tensors.update(_pack(m, m.param_buffer, "model."))
        tensors.update(_pack(m, self.ema, "ema."))
        tensors.update(_pack(m, self.adam_m, "opt.m."))
        tensors.update(_pack(m, self.adam_v, "opt.v."))
        tensors["thresholds"] = np.asarray(m.thresholds, np.float32)
        meta = {"step": self.step, "rng": rng_state(self.rng),
                "config": dataclasses.asdict(self.cfg),
                "model_config": dataclasses.asdict(m.config),
                "data": {"kind": self.ds.kind, "channels": self.ds.channels,
                         "image_size": self.ds.image_size, "num_classes": self.ds.num_classes,
                         "class_names": list(self.ds.class_names), "source": self.ds.source},
                "run_dir": os.path.abspath(self.run_dir),
                "device": self.device, "precision": self.precision}
        save_checkpoint(path, tensors, meta)

    def restore(self, tensors, meta, path):
        m = self.m
        _load_params(m, tensors, "model.", path)
        _unpack(m, tensors, "ema.", self.ema, path)
        _unpack(m, tensors, "opt.m.", self.adam_m, path)
        _unpack(m, tensors, "opt.v.", self.adam_v, path)
        _set_thresholds(m, tensors)
        self.step = int(meta["step"])
        self.rng = rng_from_state(meta["rng"])
        self.push_device()

    def ckpt_path(self, step):
        return os.path.join(self.run_dir, "checkpoints", f"{step:07d}.safetensors")


def _norm_record(m):
    """Per block of the last forward, the mean norm of what its attention and FFN/MoE
    branches added to the residual stream (RaceDiT.branch_norms)."""
    bn = m.branch_norms()
    return {"attn_norm": bn["attn"].tolist(), "ffn_norm": bn["ffn"].tolist()}


def _routing_record(m, tfrac):
    """Per-layer routing diagnostics of the last forward and experts per token by timestep
    bucket (keys are bucket indices, 0 = least noise)."""
    stats = m.layer_stats()
    rec = {}
    for key in ("max_violation", "combination_usage", "dead_experts", "experts_per_token", "tau"):
        if stats and key in stats[0]:
            rec[key] = [_num(s[key]) for s in stats]
    ept = np.asarray(m.experts_per_token_by_sample(), np.float64)            # (B,)
    b = np.minimum((np.asarray(tfrac) * NUM_T_BUCKETS).astype(np.int64), NUM_T_BUCKETS - 1)
    sums = np.bincount(b, weights=ept, minlength=NUM_T_BUCKETS)
    cnt = np.bincount(b, minlength=NUM_T_BUCKETS)
    rec["ept_by_t"] = {str(i): float(sums[i] / cnt[i]) for i in np.flatnonzero(cnt)}
    return rec


def _num(v):
    if isinstance(v, (np.ndarray, list, tuple)):
        return np.asarray(v).tolist()
    return float(v) if isinstance(v, (float, np.floating)) else int(v)


def _total_steps(cfg, n):
    if cfg.steps is not None:
        return int(cfg.steps)
    if cfg.epochs is not None:
        return int(cfg.epochs) * (n // cfg.global_batch_size)
    raise ValueError("train: give steps or epochs")


def train(model=None, *, preset=None, resume=None, init_from=None, dataset=None,
          progress=True, out=None, final_samples=True, report=True, device=None,
          precision=None, **kwargs):
    """Train a RaceDiT (or dense DiT) and return a :class:`TrainResult`.

    ``model``: a config name (default TrainConfig.model, ``"RaceDiT-S/2-2in8"``).

    Keyword arguments are :class:`TrainConfig` fields (``steps=``, ``global_batch_size=``,
    ``objective=``, ``routing=``, ``data=``/``data_path=`` ...). ``preset`` ("quick",
    "tiny") fills in a tested set of fields first; explicit arguments override it.
    ``resume``: a checkpoint path; training continues in that run's folder with that run's
    settings (only ``steps``/``epochs`` and the logging cadence may change), bit-exactly.
    ``init_from``: a checkpoint whose weights (the live ones, not the EMA) start a new run
    (fine-tuning; fresh optimiser state). ``dataset``: an ArrayDataset to use instead of
    loading ``data``. progress: a tqdm bar;
    out: a stream for messages (stdout). final_samples: write a sample grid at the end;
    report: write the routing report (MoE models).
    device: "cpu" or "cuda" (the whole step on the GPU: racedit.RaceDiT(device="cuda"));
    precision: "fp32", or on cuda "tf32" (TF32 GEMMs) or "bf16" (bf16 operands and fp32
    accumulation in every linear layer, the attention and the expert GEMMs, with fp32
    master weights; the routers' small GEMMs in TF32). Both default to "cpu"/"fp32" for a new run and to
    the checkpoint's for ``resume``; checkpoints are the same on either device (a GPU
    run resumes on the CPU and vice versa, bit-exactly only on the same device).

    Raises ValueError for bad settings or data (racedit.data.DataError names the file),
    or for device "cuda" when CUDA is not available, before the first step, and
    TrainingDiverged when the loss or a gradient turns NaN/Inf.
    """
    out = out or sys.stdout
    t_start = time.time()
    cfg = _resolve_config(model, preset, resume, kwargs)
    _validate(cfg)
    inherited = resume is not None and device is None
    if inherited:
        meta = load_checkpoint(resume)[1]
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
    tf32_was = None
    if device == "cuda":
        from .cuda import tf32

        tf32_was = tf32(precision in ("tf32", "bf16"))
    try:
        return _train(cfg, model, resume, init_from, dataset, progress, out, final_samples,
                      report, device, precision, t_start)
    finally:
        if tf32_was is not None:
            tf32(tf32_was)


def _train(cfg, model, resume, init_from, dataset, progress, out, final_samples, report,
           device, precision, t_start):
    ds = dataset if dataset is not None else load_data(
        cfg.data, cfg.data_path, image_size=cfg.image_size, num_classes=cfg.num_classes,
        seed=cfg.seed, n=cfg.num_samples)
    if not isinstance(ds, ArrayDataset):
        raise TypeError(f"dataset: expected a racedit.data.ArrayDataset, got {type(ds).__name__}")
    if len(ds) < cfg.global_batch_size:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} exceeds the {len(ds)} "
                         "samples of the data set")
    total = _total_steps(cfg, len(ds))
    m = build_model(cfg, ds.channels, ds.image_size, ds.num_classes, device, precision)
    if resume is not None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(resume)))
    else:
        run_dir = _new_run_dir(cfg.results_dir, m.config.name)
    tr = _Trainer(cfg, ds, m, run_dir, progress, out, precision)
    log_path = os.path.join(run_dir, "log.jsonl")
    if resume is not None:
        tensors, meta = load_checkpoint(resume)
        tr.restore(tensors, meta, resume)
        _truncate_log(log_path, tr.step)
        print(f"racedit: resumed {run_dir} at step {tr.step}", file=out)
    elif init_from is not None:
        tensors, _ = load_checkpoint(init_from)
        _load_params(m, tensors, "model.", init_from)
        _set_thresholds(m, tensors)
        tr.ema[...] = m.param_buffer
        tr.push_device()
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    on = f" on cuda ({precision})" if device == "cuda" else ""
    print(f"racedit: {m.config.name}, {m.num_params():,} parameters "
          f"({m.num_activated_params():,} activated), data {ds!r}, {total} steps of "
          f"{cfg.global_batch_size}{on} -> {run_dir}", file=out)
    records = _read_log(log_path)
    _loop(tr, total, records, log_path)
    last_ckpt = tr.ckpt_path(tr.step)
    tr.save(last_ckpt)  # also brings a GPU run's EMA to the host (tr.ema)
    print(f"racedit: saved {last_ckpt}", file=out)
    if final_samples:
        p = os.path.join(run_dir, "samples", f"{tr.step:07d}.png")
        _sample_grid(tr, p, 8, progress=progress)
        print(f"racedit: sample grid {p}", file=out)
    if report and m.config.is_moe:
        from .report import routing_report

        rep = routing_report(m, tr.ema, tr.obj, ds, records, run_dir, seed=cfg.seed)
        print(f"racedit: routing report {rep['json']} and {rep['png']}", file=out)
    return TrainResult(run_dir, last_ckpt, records, m, tr.ema, cfg, ds, time.time() - t_start)


def _resolve_config(model, preset, resume, kwargs):
    """The TrainConfig of a new run (preset, then model, then explicit settings) or of a
    resumed one (the checkpoint's, with steps/epochs and the cadences overridable)."""
    if resume is not None:
        _, meta = load_checkpoint(resume)
        fields = dict(meta["config"])
        for k in ("steps", "epochs", "log_every", "ckpt_every", "sample_every"):
            if kwargs.get(k) is not None:
                fields[k] = kwargs[k]
        if kwargs.get("steps") is not None:
            fields["epochs"] = None
        return _config_from_dict(fields)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    fields = dict(PRESETS[preset]) if preset else {}
    if model is not None:
        if model != fields.get("model"):
            fields.pop("model_config", None)  # the preset's sizes belong to its model
        fields["model"] = model
    fields.update({k: v for k, v in kwargs.items() if v is not None})
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train: unknown settings {unknown}; see racedit.TrainConfig")
    return TrainConfig(**fields)


def _loop(tr, total, records, log_path):
    """Steps until ``total``: a JSONL record per step, a summary every log_every steps
    (the tqdm bar's postfix, or a printed line), checkpoints and sample grids on cadence."""
    cfg = tr.cfg
    bar = _bar(tr.progress, total, tr.step)
    window = []
    with open(log_path, "a") as log:
        while tr.step < total:
            t0 = time.perf_counter()
            rec = tr.train_step()
            rec["images_per_s"] = cfg.global_batch_size / max(time.perf_counter() - t0, 1e-9)
            log.write(json.dumps(rec) + "\n")
            records.append(rec)
            window.append(rec)
            if bar is not None:
                bar.update(1)
            if tr.step % cfg.log_every == 0 or tr.step == total:
                msg = _summary(window)
                window = []
                if bar is not None:
                    bar.set_postfix_str(msg)
                else:
                    print(f"step {tr.step:7d} {msg}", file=tr.out)
                log.flush()
            if cfg.ckpt_every and tr.step % cfg.ckpt_every == 0 and tr.step < total:
                tr.save(tr.ckpt_path(tr.step))
            if cfg.sample_every and tr.step % cfg.sample_every == 0 and tr.step < total:
                _sample_grid(tr, os.path.join(tr.run_dir, "samples", f"{tr.step:07d}.png"), 4)
    if bar is not None:
        bar.close()


def _set_thresholds(m, tensors, path="checkpoint"):
    """Restore the routing thresholds (NaN entries, saved before a layer's first training
    forward, leave that layer to initialise its threshold from its next batch)."""
    from .checkpoint import CheckpointError

    th = tensors.get("thresholds")
    if th is not None and th.size:
        try:
            m.thresholds = th
        except ValueError as e:  # one per MoE layer
            raise CheckpointError(f"{path}: tensor 'thresholds' does not fit the model ({e})") from None


def _validate(cfg):
    if cfg.global_batch_size < 1:
        raise ValueError(f"global_batch_size: expected >= 1, got {cfg.global_batch_size}")
    if cfg.steps is not None and cfg.steps < 0:
        raise ValueError(f"steps: expected >= 0, got {cfg.steps}")
    if cfg.epochs is not None and cfg.epochs < 0:
        raise ValueError(f"epochs: expected >= 0, got {cfg.epochs}")
    if cfg.objective not in ("ddpm", "flow"):
        raise ValueError(f"objective: expected 'ddpm' or 'flow', got {cfg.objective!r}")
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


def _read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_log(path, step):
    """Drop records after ``step`` (a run that went on past its last checkpoint)."""
    recs = [r for r in _read_log(path) if r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _sample_grid(tr, path, per_class, progress=False):
    """Sample ``per_class`` images of each class (up to 10 classes) with the EMA weights
    and write a grid (one row per class)."""
    from .sample import generate, save_grid

    ncls = min(tr.ds.num_classes, 10)
    labels = np.repeat(np.arange(ncls), per_class)
    cfg = tr.cfg
    tr.sync_host()
    x = generate(tr.m, tr.obj, labels, weights=tr.ema, cfg_scale=cfg.cfg_scale,
                 sampler=cfg.sampler, num_steps=cfg.num_sampling_steps, seed=cfg.seed,
                 clip_denoised=tr.ds.kind == "pixels", progress=progress)
    if tr.ds.kind == "pixels":
        save_grid(x, path, ncol=per_class)
    else:
        np.save(path.replace(".png", ".npy"), x)
