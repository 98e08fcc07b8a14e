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
import re
import subprocess
import sys
import time

import numpy as np

from . import optim
from .checkpoint import (CheckpointError, load_checkpoint, rng_from_state, rng_state,
                         save_checkpoint)
from .data import ArrayDataset, load_data
from .diffusion import make_objective
from .threads import thread_limit

__all__ = ["train", "TrainConfig", "TrainResult", "TrainingDiverged", "PRESETS", "build_model",
           "model_from_checkpoint", "read_log", "NUM_T_BUCKETS", "DEVICES", "PRECISIONS"]

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")  # tf32 / bf16: cuda only

NUM_T_BUCKETS = 10  # experts-per-token statistics are grouped into this many timestep bins


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/Inf; the message names the step and the first
    parameter (in buffer order, i.e. the first layer) where it appeared."""


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a run (saved as config.json and in each checkpoint).

    model: a name from racedit.configs (``"RaceDiT-S/2-2in8"``, ``"DiT-S/2"``, ...) or a
    preset's model (``"RaceDiT-quick/4-2in8"``); model_config: ModelConfig fields (depth,
    hidden, heads, patch, num_experts, k, expert_hidden) overriding the named model's, for
    sizes between the table's; train() completes it (expert_hidden follows 4*hidden/k unless
    given) and names a changed model ``RaceDiT-<depth>x<hidden>/<p>-<k>in<E>``. data: one of
    racedit.data.DATA_KINDS with data_path; channels: 1 (grayscale) or 3 for image data
    (None: the data's own); num_classes: must match the data's (latents: may exceed it);
    steps or epochs (steps wins; an epoch is len(data) // global_batch_size steps);
    grad_clip <= 0 disables clipping; warmup_steps: linear lr warm-up; log_every: the
    cadence of log.txt and of the per-layer statistics in log.jsonl (every step with
    log_layers_every_step); the rest as DiT.
    """

    model: str = "RaceDiT-S/2-2in8"
    model_config: dict = None
    data: str = "builtin"
    data_path: str = None
    num_samples: int = 10000
    image_size: int = 32
    channels: int = None
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
    log_layers_every_step: bool = False
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


def _imagenet256(model):
    """A preset for the paper's ImageNet 256x256 models: ``model`` (a configs-table name) on
    SD-VAE latents, 32x32x4 (``racedit encode --image-size 256`` writes them; train with
    ``--data latents PATH``). The paper states: AdamW lr 1e-4, betas 0.9/0.999, weight decay
    0, EMA 0.9999, label dropout 0.1, patch 2, race routing with identity gating, PLR and
    router similarity on. racedit's choices, where the paper is silent, are DiT's recipe
    (marked "ours" below)."""
    from .configs import get_config

    shape = {k: v for k, v in dataclasses.asdict(get_config(model)).items() if k != "name"}
    return dict(
        model=model, model_config=shape, data="latents", num_classes=1000,
        lr=1e-4, weight_decay=0.0, ema_decay=0.9999, class_dropout_prob=0.1,   # the paper's
        routing="race", gating="identity",                                      # the paper's
        plr_weight=1.0, sim_weight=0.01, beta=0.99,                             # ours (SPEC)
        objective="ddpm", learn_sigma=True,               # ours: DiT's eps + hybrid loss
        global_batch_size=256, steps=400000,              # ours: DiT's batch, its ablation length
        grad_clip=0.0, warmup_steps=0, hflip=False,       # ours: DiT's (flips: encode --hflip)
        log_every=100, ckpt_every=50000, sample_every=0,  # ours: DiT's cadence; grids need a VAE
        cfg_scale=1.5, sampler="ddpm", num_sampling_steps=250)  # ours: DiT's FID-50K sampling


# The paper's ImageNet-256 models (Table 4) and the dense DiTs of the same activated size.
PRESETS.update({f"imagenet256-{n.split('/')[0].lower()}": _imagenet256(n) for n in (
    "RaceDiT-B/2-4in32", "RaceDiT-M/2-4in32", "RaceDiT-L/2-4in32", "RaceDiT-XL/2-4in32",
    "DiT-B/2", "DiT-M/2", "DiT-L/2", "DiT-XL/2")})


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the run folder, the last checkpoint written, the per-step
    log records (each step's latest, from step 1), the trained model (live weights) and its
    EMA buffer (float32 (n,))."""

    run_dir: str
    checkpoint: str
    log: list
    model: object
    ema: np.ndarray
    config: TrainConfig
    dataset: object = None
    wall_time: float = 0.0
    report: str = None  # the routing report's JSON (MoE runs with report=True)


# ---- models --------------------------------------------------------------------------

def _model_config(cfg):
    from .configs import ModelConfig, get_config

    if cfg.model_config:
        return ModelConfig(name=cfg.model, **cfg.model_config)
    return get_config(cfg.model)


SHAPE_KEYS = ("depth", "hidden", "heads", "patch", "num_experts", "k", "expert_hidden")


def _base_shape(name):
    """The ModelConfig fields of a preset's model or a configs-table name; None for a name
    neither knows (then model_config must describe the whole model)."""
    from .configs import get_config

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


def run_folder(ckpt):
    """The run folder of checkpoint ``ckpt`` (``<run>/checkpoints/<step>.safetensors`` with
    ``<run>/config.json``), or None for a checkpoint kept anywhere else."""
    folder = os.path.dirname(os.path.abspath(ckpt))
    run = os.path.dirname(folder)
    if os.path.basename(folder) == "checkpoints" and os.path.isfile(os.path.join(run, "config.json")):
        return run
    return None


def _check_out_dir(path, what):
    """ValueError, before any work, when folder ``path`` cannot be created or written: it
    is a file, lies under a file, or its nearest existing ancestor is not writable."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"{what}: {path} cannot be a folder: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path}: cannot write in {p} (permission denied)")


# The data settings each data kind reads (config.json records only these).
DATA_SETTINGS = {"builtin": ("num_samples", "image_size", "num_classes"),
                 "folder": ("data_path", "image_size", "channels", "num_classes"),
                 "latents": ("data_path", "num_classes"),
                 "mnist": ("data_path", "image_size", "channels", "num_classes"),
                 "cifar10": ("data_path", "channels", "num_classes")}


def _source_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version_info():
    """{"racedit_version", "git_commit"}: the commit of the git checkout racedit runs from
    (an editable install or the source tree), None for an installed package."""
    from . import __version__

    root, commit = _source_root(), None
    if os.path.exists(os.path.join(root, ".git")):  # a file in a git worktree
        try:
            p = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                               text=True, timeout=10)
            commit = p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"racedit_version": __version__, "git_commit": commit or None}


def _write_config(run_dir, cfg):
    """config.json: the settings (of the data, only those its kind reads) and the version."""
    d = dataclasses.asdict(cfg)
    for k in {k for v in DATA_SETTINGS.values() for k in v} - set(DATA_SETTINGS[cfg.data]):
        d.pop(k)
    d.update(version_info())
    tmp = os.path.join(run_dir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(d, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "config.json"))


# ---- logs -----------------------------------------------------------------------------

class _RunLog:
    """A run's two logs, appended to: log.jsonl (a record per step) and log.txt (timestamped
    lines for people). ``sync`` flushes and fsyncs both; the trainer calls it before every
    checkpoint so that the records a checkpoint covers are on disk when it is."""

    def __init__(self, run_dir, out):
        self.out = out
        self.jsonl = open(os.path.join(run_dir, "log.jsonl"), "a")
        try:
            self.txt = open(os.path.join(run_dir, "log.txt"), "a")
        except BaseException:
            self.jsonl.close()
            raise

    def record(self, rec):
        self.jsonl.write(json.dumps(rec) + "\n")

    def line(self, msg, echo=True):
        """A log.txt line; echoed to ``out`` as ``racedit: msg`` unless echo is False."""
        self.txt.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}\n")
        self.txt.flush()
        if echo:
            print(f"racedit: {msg}", file=self.out)

    def flush(self):
        self.jsonl.flush()

    def sync(self):
        """Flush and fsync both logs; returns log.jsonl's size in bytes."""
        for f in (self.jsonl, self.txt):
            f.flush()
            os.fsync(f.fileno())
        return self.jsonl.tell()

    def close(self):
        self.jsonl.close()
        self.txt.close()


def _log_lines(path, upto_bytes=None):
    """(objects of the complete lines, bytes of a torn last line) of log.jsonl, read up to
    ``upto_bytes``. A last line that does not parse was cut short by a kill; any other line
    that does not parse is an error naming the file and line."""
    with open(path, "rb") as f:
        data = f.read() if upto_bytes is None else f.read(upto_bytes)
    lines = data.split(b"\n")
    objs = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            objs.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                return objs, len(line)
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({e})") from None
    return objs, 0


def read_log(path, upto_step=None, upto_bytes=None, out=None):
    """The step records of a run's log.jsonl, one per step in step order: a ``resume``
    event at step N drops the records of steps > N written before it. ``upto_step`` /
    ``upto_bytes`` (a checkpoint's step and ``log_bytes``) give the log as that checkpoint
    saw it. A torn last line is dropped with a warning on ``out`` (stderr); a missing file
    reads as no records."""
    if not os.path.exists(path):
        return []
    objs, torn = _log_lines(path, upto_bytes)
    if torn:
        print(f"racedit: warning: {path}: dropped a torn last line ({torn} bytes; a write "
              "cut short)", file=out or sys.stderr)
    recs = []
    for r in objs:
        if r.get("event") == "resume":
            while recs and recs[-1]["step"] > r["step"]:
                recs.pop()
        elif "event" not in r:
            recs.append(r)
    return [r for r in recs if upto_step is None or r["step"] <= upto_step]


def _repair_tail(path, out):
    """Before appending to log.jsonl: cut a torn last line (with a warning) or end a
    complete last record that lacks its newline, so the next record starts a line."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        _, torn = _log_lines(path)
        if torn:
            f.truncate(f.seek(0, os.SEEK_END) - torn)
            print(f"racedit: warning: {path}: dropped a torn last line ({torn} bytes; a write "
                  "cut short)", file=out)
        else:
            f.write(b"\n")


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
        self.log = None  # a _RunLog: synced before every checkpoint
        self._ept = np.zeros((2, NUM_T_BUCKETS))  # experts-per-token sums / counts since the last record

    # data order: a permutation per epoch, a pure function of (seed, epoch)
    def batch_indices(self, step):
        epoch, k = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = np.random.default_rng([self.cfg.seed, 2, epoch]).permutation(len(self.ds))
            self._perm_epoch = epoch
        return self._perm[k * self.B:(k + 1) * self.B]

    def train_step(self, layers=True):
        """One step; returns its log record, with the per-layer statistics when ``layers``."""
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
            return self._device_step(x0, y, t, x_t, target, layers)
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
        return self._statistics(rec, t, layers)

    def _device_step(self, x0, y, t, x_t, target, layers):
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
        return self._statistics(rec, t, layers)

    def _statistics(self, rec, t, layers):
        """Add the per-layer statistics of this step's forward to ``rec`` when ``layers``;
        experts per token by timestep bucket is counted every step and recorded (as the mean
        since the last record holding it) with them."""
        m = self.m
        if self.is_moe:
            self._ept += _ept_by_t(m, self.obj.time_fraction(t))
        if not layers:
            return rec
        rec.update(_norm_record(m))
        if self.is_moe:
            rec.update(_routing_record(m))
            sums, cnt = self._ept
            rec["ept_by_t"] = {str(i): float(sums[i] / cnt[i]) for i in np.flatnonzero(cnt)}
            self._ept[:] = 0
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
        log_bytes = self.log.sync() if self.log is not None else None
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
                "run_dir": os.path.abspath(self.run_dir), "log_bytes": log_bytes,
                "ept_window": self._ept.tolist(),
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
        # the experts-per-token sums since the last record, so that the next record of a
        # resumed run averages the same steps as the uninterrupted run's
        window = np.asarray(meta.get("ept_window", np.zeros_like(self._ept)), np.float64)
        if window.shape != self._ept.shape:
            raise CheckpointError(f"{path}: metadata 'ept_window': expected shape "
                                  f"{self._ept.shape}, got {window.shape}")
        self._ept[...] = window
        self.push_device()

    def ckpt_path(self, step):
        return os.path.join(self.run_dir, "checkpoints", f"{step:07d}.safetensors")


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
             "sample_every", "cfg_scale", "sampler", "num_sampling_steps", "results_dir")


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

    Raises ValueError for bad settings or data (racedit.data.DataError names the file), an
    output folder that cannot be written, or device "cuda" when CUDA is not available,
    before the first step; OSError when writing fails later (a full disk); and
    TrainingDiverged when the loss or a gradient turns NaN/Inf.
    """
    with thread_limit(threads):
        return _start(model, preset, resume, init_from, dataset, progress, out, final_samples,
                      report, device, precision, kwargs)


def _start(model, preset, resume, init_from, dataset, progress, out, final_samples, report,
           device, precision, kwargs):
    out = out or sys.stdout
    t_start = time.time()
    meta = load_checkpoint(resume)[1] if resume is not None else None
    cfg, changes = _resolve_config(model, preset, meta, kwargs)
    _validate(cfg)
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
    if progress is None:
        progress = sys.stderr.isatty()
    job = _Job(resume, meta, changes, run_dir, init_from, dataset, progress, out,
               final_samples, report, device, precision, t_start)
    tf32_was = None
    if device == "cuda":
        from .cuda import tf32

        tf32_was = tf32(precision in ("tf32", "bf16"))
    try:
        return _train(cfg, job)
    finally:
        if tf32_was is not None:
            tf32(tf32_was)


def _output_folder(cfg, resume, results_dir):
    """The run folder a resumed run continues in (None: a new numbered one in
    cfg.results_dir), after checking that the output can be written."""
    if resume is None or results_dir is not None:
        _check_out_dir(cfg.results_dir, "results_dir (--results-dir)")
        return None
    run = run_folder(resume)
    if run is None:
        raise ValueError(f"resume: {resume} is not in a run folder (<run>/checkpoints/ with "
                         "<run>/config.json); give --results-dir DIR (results_dir=) to continue "
                         "it in a new numbered run folder there")
    _check_out_dir(run, "resume")
    return run


def _load_data(cfg, dataset=None):
    """The run's data set (``dataset``, or loaded as cfg says), checked against the
    settings that describe it (num_classes, channels)."""
    if dataset is None:
        # channels None: the loader's own (RGB for images)
        extra = {} if cfg.channels is None else {"channels": cfg.channels}
        dataset = load_data(cfg.data, cfg.data_path, image_size=cfg.image_size,
                            num_classes=cfg.num_classes, seed=cfg.seed, n=cfg.num_samples,
                            **extra)
    if not isinstance(dataset, ArrayDataset):
        raise TypeError(f"dataset: expected a racedit.data.ArrayDataset, got {type(dataset).__name__}")
    for key in ("num_classes", "channels"):
        want = getattr(cfg, key)
        if want is not None and want != getattr(dataset, key):
            raise ValueError(f"{key} (--{key.replace('_', '-')}): {want} does not match the "
                             f"data, which has {getattr(dataset, key)} ({dataset.source or cfg.data})")
    if len(dataset) < cfg.global_batch_size:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} exceeds the {len(dataset)} "
                         "samples of the data set")
    return dataset


def _train(cfg, job):
    ds = _load_data(cfg, job.dataset)
    total = _total_steps(cfg, len(ds))
    m = build_model(cfg, ds.channels, ds.image_size, ds.num_classes, job.device, job.precision)
    run_dir = job.run_dir or _new_run_dir(cfg.results_dir, m.config.name)
    tr = _Trainer(cfg, ds, m, run_dir, job.progress, job.out, job.precision)
    records, notes = [], []
    if job.resume is not None:
        tensors, _ = load_checkpoint(job.resume)
        tr.restore(tensors, job.meta, job.resume)
        records, notes = _resume_history(tr, job)
    elif job.init_from is not None:
        tensors, _ = load_checkpoint(job.init_from)
        _load_params(m, tensors, "model.", job.init_from)
        _set_thresholds(m, tensors)
        tr.ema[...] = m.param_buffer
        tr.push_device()
    tr.log = log = _RunLog(run_dir, job.out)
    try:
        if job.resume is not None:
            _log_resume(tr, job, notes)
        _write_config(run_dir, cfg)
        on = f" on cuda ({job.precision})" if job.device == "cuda" else ""
        log.line(f"{m.config.name}, {m.num_params():,} parameters "
                 f"({m.num_activated_params():,} activated), data {ds!r}, {total} steps of "
                 f"{cfg.global_batch_size}{on} -> {run_dir}")
        _loop(tr, total, records, log)
        return _finish(tr, job, records, log)
    except KeyboardInterrupt:
        _last_words(log, f"interrupted at step {tr.step}; {_latest_checkpoint(tr)}", job.out)
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
    tr.save(last_ckpt)  # also brings a GPU run's EMA to the host (tr.ema)
    log.line(f"saved {last_ckpt}")
    if job.final_samples:
        p = os.path.join(run_dir, "samples", f"{tr.step:07d}.png")
        _sample_grid(tr, p, 8, progress=job.progress)
        log.line(f"sample grid {p}")
    rep = None
    if job.report and m.config.is_moe:
        from .report import routing_report

        rep = routing_report(m, tr.ema, tr.obj, tr.ds, records, run_dir, seed=cfg.seed,
                             step=tr.step)
        log.line(f"routing report {rep['json']} and {rep['png']}"
                 + (" (replacing the earlier report of this step)" if rep["replaced"] else ""))
    wall = time.time() - job.t_start
    log.line(f"done at step {tr.step} in {wall:.1f} s", echo=False)
    return TrainResult(run_dir, last_ckpt, records, m, tr.ema, cfg, tr.ds, wall,
                       rep and rep["json"])


def _last_words(log, msg, out):
    """A last log.txt line (echoed to ``out`` when given) that never hides the error that
    ended the run (writing may be what failed)."""
    try:
        log.line(msg, echo=False)
    except OSError:
        pass
    if out is not None:
        print(f"racedit: {msg}", file=out)


def _latest_checkpoint(tr):
    d = os.path.join(tr.run_dir, "checkpoints")
    steps = sorted(int(f[:7]) for f in os.listdir(d) if re.fullmatch(r"\d{7}\.safetensors", f))
    done = [s for s in steps if s <= tr.step]
    if not done:
        return "no checkpoint written yet"
    p = tr.ckpt_path(done[-1])
    return f"the latest checkpoint is {p} (continue with --resume {p})"


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
        _repair_tail(src, job.out)
    recs = read_log(src, upto_step=n, upto_bytes=job.meta.get("log_bytes"),
                    out=job.out) if src else []
    if same:
        later = [r["step"] for r in read_log(src, out=io.StringIO()) if r["step"] > n]
        if later:
            notes.append(f"log.jsonl keeps the records of steps {later[0]}-{later[-1]} written "
                         f"before; the records from step {n + 1} on supersede them")
        files = _files_after(tr.run_dir, n)
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


def _files_after(run_dir, n):
    """'checkpoints 0000008, 0000010 and sample grids 0000010' for the files of steps > n."""
    parts = []
    for what, sub, pat in (("checkpoints", "checkpoints", r"(\d{7})\.safetensors"),
                           ("sample grids", "samples", r"(\d{7})\.(png|npy)")):
        d = os.path.join(run_dir, sub)
        names = os.listdir(d) if os.path.isdir(d) else []
        found = sorted({m.group(1) for m in (re.fullmatch(pat, f) for f in names)
                        if m and int(m.group(1)) > n})
        if found:
            parts.append(f"{what} {', '.join(found)}")
    return " and ".join(parts)


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
    shape = dataclasses.asdict(_model_config(_config_from_dict(fields)))
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
    return _config_from_dict(fields), changes


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
            if cfg.sample_every and tr.step % cfg.sample_every == 0 and tr.step < total:
                _sample_grid(tr, os.path.join(tr.run_dir, "samples", f"{tr.step:07d}.png"), 4)
    finally:
        if bar is not None:
            bar.close()


def _set_thresholds(m, tensors, path="checkpoint"):
    """Restore the routing thresholds (NaN entries, saved before a layer's first training
    forward, leave that layer to initialise its threshold from its next batch)."""
    th = tensors.get("thresholds")
    if th is not None and th.size:
        try:
            m.thresholds = th
        except ValueError as e:  # one per MoE layer
            raise CheckpointError(f"{path}: tensor 'thresholds' does not fit the model ({e})") from None


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
