"""Model configurations: a table like facebookresearch/DiT's (``"DiT-XL/2"`` -> depth,
width, heads, patch) extended with Race-DiT's MoE variants ``"RaceDiT-<size>/<p>-<k>in<E>"``
(E candidate experts, k activated per token on average, expert hidden width He = 4*D/k so
the activated FFN FLOPs equal the dense DiT's; SPEC §1-§2).

Sizes (depth, hidden D, heads): T (2, 32, 2) for tests, S (12, 384, 6), B (12, 768, 12),
M (16, 960, 16), L (24, 1024, 16), XL (28, 1152, 16); patches 2, 4, 8.
"""
import re
from dataclasses import dataclass

__all__ = ["ModelConfig", "SIZES", "CONFIGS", "get_config", "count_params"]

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
