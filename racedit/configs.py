"""Model configurations: a table like facebookresearch/DiT's (``"DiT-XL/2"`` -> depth,
width, heads, patch) extended with Race-DiT's MoE variants ``"RaceDiT-<size>/<p>-<k>in<E>"``
(E candidate experts, k activated per token on average, expert hidden width He = 4*D/k so
the activated FFN FLOPs equal the dense DiT's; docs/method.md §1-§2).

Sizes (depth, hidden D, heads): T (2, 32, 2) for tests, S (12, 384, 6), B (12, 768, 12),
M (16, 960, 16), L (24, 1024, 16), XL (28, 1152, 16); patches 2, 4, 8.

A training run's settings are a :class:`TrainConfig` (the model's name or shape, the data,
the objective, the optimiser and the cadences), saved as a run's config.json and in each
checkpoint; :data:`PRESETS` are tested sets of them for CPU-scale runs.
"""
import dataclasses
import re
from dataclasses import dataclass

__all__ = ["ModelConfig", "SIZES", "CONFIGS", "get_config", "count_params", "TrainConfig",
           "PRESETS", "DATA_SETTINGS", "PLR_OVER_LAYERS"]

SIZES = {  # name: (depth, hidden, heads)
    "T": (2, 32, 2),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "M": (16, 960, 16),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCHES = (2, 4, 8)
FREQ_DIM = 256  # sinusoidal timestep features (DiT)
PLR_OVER_LAYERS = ("mean", "sum")  # how the layers' PLR losses combine (docs/method.md §4)


@dataclass(frozen=True)
class ModelConfig:
    """One backbone. ``num_experts == 0`` means dense DiT blocks (a GELU-tanh MLP of width
    4*hidden; then ``k == 0`` and ``expert_hidden == 0``); otherwise every block's MLP is an
    MoE with ``num_experts`` experts of width ``expert_hidden``, ``k`` per token on average."""

    name: str
    depth: int
    hidden: int
    heads: int
    patch: int
    num_experts: int = 0
    k: int = 0
    expert_hidden: int = 0

    @property
    def is_moe(self):
        """True when the blocks' FFN is a Mixture of Experts."""
        return self.num_experts > 0


def _dense(size, p):
    depth, D, NH = SIZES[size]
    return ModelConfig(f"DiT-{size}/{p}", depth, D, NH, p)


def _moe(size, p, k, E):
    depth, D, NH = SIZES[size]
    name = f"RaceDiT-{size}/{p}-{k}in{E}"
    if not (1 <= k <= E):
        raise ValueError(f"{name}: need 1 <= k <= E, got k={k}, E={E}")
    if (4 * D) % k:
        raise ValueError(f"{name}: expert width 4*D/k = {4 * D}/{k} is not an integer")
    return ModelConfig(name, depth, D, NH, p, E, k, 4 * D // k)


CONFIGS = {}
for _s in SIZES:
    for _p in PATCHES:
        CONFIGS[f"DiT-{_s}/{_p}"] = _dense(_s, _p)
for _s, _k, _E in [("T", 2, 4), ("T", 1, 4), ("S", 2, 8), ("S", 4, 32), ("B", 2, 8),
                   ("B", 4, 32), ("M", 4, 32), ("L", 4, 32), ("XL", 4, 32)]:
    _c = _moe(_s, 2, _k, _E)
    CONFIGS[_c.name] = _c

_MOE_RE = re.compile(r"^RaceDiT-(T|S|B|M|L|XL)/(\d+)-(\d+)in(\d+)$")
_DENSE_RE = re.compile(r"^DiT-(T|S|B|M|L|XL)/(\d+)$")


def get_config(name):
    """The ModelConfig called `name`: a key of CONFIGS, or any ``"DiT-<size>/<p>"`` or
    ``"RaceDiT-<size>/<p>-<k>in<E>"`` with size in T, S, B, M, L, XL. A ModelConfig is
    returned unchanged. ValueError (listing the known names) otherwise."""
    if isinstance(name, ModelConfig):
        return name
    if not isinstance(name, str):
        raise TypeError(f"config: expected a str or ModelConfig, got {type(name).__name__}")
    if name in CONFIGS:
        return CONFIGS[name]
    m = _MOE_RE.match(name)
    if m and int(m.group(2)) >= 1:
        return _moe(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
    m = _DENSE_RE.match(name)
    if m and int(m.group(2)) >= 1:
        return _dense(m.group(1), int(m.group(2)))
    raise ValueError(f"config: unknown model {name!r}; expected one of {sorted(CONFIGS)} or "
                     "'DiT-<T|S|B|M|L|XL>/<p>' or 'RaceDiT-<T|S|B|M|L|XL>/<p>-<k>in<E>'")


def count_params(cfg, input_size=32, in_channels=4, num_classes=1000, learn_sigma=False):
    """Parameter counts of a model built from `cfg` (a name or ModelConfig).

    Returns dict(
      total:    every float of the parameter buffer (= RaceDiT.num_params()): embeddings,
                blocks with biases, routers, gates, all experts, PLR heads, final layer;
      activated: what one token uses at inference: total minus the experts it does not
                use (k of E are used on average) and minus the PLR heads (training only);
      blocks:   the paper's Table 4 convention, per block 4D^2 (attention) + 6D^2 (adaLN)
                + 8D^2 (dense MLP) or E*2*D*He (experts) + D^2 (router's first layer), no
                biases, no embeddings, no final layer;
      blocks_activated: the same with k experts instead of E.)
    """
    c = get_config(cfg)
    D, p, C = c.hidden, c.patch, in_channels
    Co = 2 * C if learn_sigma else C
    emb = D * C * p * p + D + (FREQ_DIM * D + D) + (D * D + D) + (num_classes + 1) * D
    final = (p * p * Co * D + p * p * Co) + (2 * D * D + 2 * D)
    attn_ada = (3 * D * D + 3 * D) + (D * D + D) + (6 * D * D + 6 * D)
    if c.is_moe:
        E, k, He, P = c.num_experts, c.k, c.expert_hidden, p * p * C
        expert = 2 * D * He + He + D
        router = (D * D + D) + (D * E + E)
        plr = D * P + P
        blk = attn_ada + router + E * expert + plr
        blk_act = attn_ada + router + k * expert
        paper = 4 * D * D + 6 * D * D + E * 2 * D * He + D * D
        paper_act = 4 * D * D + 6 * D * D + k * 2 * D * He + D * D
    else:
        blk = blk_act = attn_ada + (4 * D * D + 4 * D) + (4 * D * D + D)
        paper = paper_act = 18 * D * D
    n = c.depth
    return dict(total=emb + n * blk + final, activated=emb + n * blk_act + final,
                blocks=n * paper, blocks_activated=n * paper_act)


# ---- training runs ---------------------------------------------------------------------

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
    log_layers_every_step); plr_over_layers: ``"mean"`` (L_PLR is the mean of the layers'
    losses, each weighted plr_weight / depth) or ``"sum"`` (their sum, each weighted
    plr_weight); grad_accum: micro-batches per rank per optimizer step, each
    global_batch_size / (ranks x grad_accum) samples (racedit.distributed); the rest as DiT.
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
    plr_weight: float = 0.01
    plr_over_layers: str = "mean"
    sim_weight: float = 0.01
    balance_weight: float = 0.0
    beta: float = 0.99
    global_batch_size: int = 32
    grad_accum: int = 1
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


    def to_model_config(self):
        """The ModelConfig of the run: ``model_config``'s fields named ``model``, or the
        configs table's ``model``."""
        if self.model_config:
            return ModelConfig(name=self.model, **self.model_config)
        return get_config(self.model)

    def model_plr_weight(self):
        """The plr_weight the model is built with. The model takes the mean of its layers'
        PLR losses, so the sum over layers is that mean with plr_weight * depth. ValueError
        for an unknown ``plr_over_layers``."""
        if self.plr_over_layers not in PLR_OVER_LAYERS:
            raise ValueError(f"plr_over_layers: expected one of {PLR_OVER_LAYERS}, got "
                             f"{self.plr_over_layers!r}")
        if self.plr_over_layers == "sum":
            return self.plr_weight * self.to_model_config().depth
        return self.plr_weight

    @classmethod
    def from_dict(cls, d):
        """The TrainConfig of a checkpoint's or config.json's settings (other keys, such as
        the version config.json records, are left out)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


# Sizes between the configs table's T and S, for CPU-scale runs. "quick": a 4-block
# RaceDiT (D=128, patch 4, 8 experts, 2 per token on average, 1.35M activated parameters)
# trained with rectified flow for 4000 steps of 32 built-in shapes: 6 to 10 minutes on 2
# cores (230-360 images/s, depending on the CPU), after which the sample grid shows the
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
    shape = {k: v for k, v in dataclasses.asdict(get_config(model)).items() if k != "name"}
    return dict(
        model=model, model_config=shape, data="latents", num_classes=1000,
        lr=1e-4, weight_decay=0.0, ema_decay=0.9999, class_dropout_prob=0.1,   # the paper's
        routing="race", gating="identity",                                      # the paper's
        plr_weight=0.01, sim_weight=0.01, beta=0.99,                            # ours
        objective="ddpm", learn_sigma=True,               # ours: DiT's eps + hybrid loss
        global_batch_size=256, steps=400000,              # ours: DiT's batch, its ablation length
        grad_clip=0.0, warmup_steps=0, hflip=False,       # ours: DiT's (flips: encode --hflip)
        log_every=100, ckpt_every=50000, sample_every=0,  # ours: DiT's cadence; grids need a VAE
        cfg_scale=1.5, sampler="ddpm", num_sampling_steps=250)  # ours: DiT's FID-50K sampling


# The paper's ImageNet-256 models (Table 4) and the dense DiTs of the same activated size.
PRESETS.update({f"imagenet256-{n.split('/')[0].lower()}": _imagenet256(n) for n in (
    "RaceDiT-B/2-4in32", "RaceDiT-M/2-4in32", "RaceDiT-L/2-4in32", "RaceDiT-XL/2-4in32",
    "DiT-B/2", "DiT-M/2", "DiT-L/2", "DiT-XL/2")})


# The data settings each data kind reads (config.json records only these).
DATA_SETTINGS = {"builtin": ("num_samples", "image_size", "num_classes"),
                 "folder": ("data_path", "image_size", "channels", "num_classes"),
                 "latents": ("data_path", "num_classes"),
                 "mnist": ("data_path", "image_size", "channels", "num_classes"),
                 "cifar10": ("data_path", "channels", "num_classes")}
