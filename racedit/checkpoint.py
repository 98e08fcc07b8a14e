"""racedit.checkpoint — crash-safe safetensors checkpoints.

A checkpoint is one ``.safetensors`` file (the ``safetensors`` package's NumPy API) holding
named float32/int arrays — for training: the model parameters ``model.<name>``, their EMA
``ema.<name>``, the AdamW moments ``opt.m.<name>`` / ``opt.v.<name>`` and the routing
thresholds ``thresholds`` (the model's ``threshold_shape``: one per layer for race, per
layer and expert for BL, per layer and position for BE, none for the other strategies) —
and, in the header metadata, one JSON document (key
``racedit``) with the step, the model/training config and the random generator state.
:func:`pack_params` names the slices of a flat buffer laid out like a model's
``param_buffer`` (its ``layout``) and :func:`unpack_params` fills one back.

Writing is atomic: the file is written to a temporary name in the same folder, flushed and
fsync'd, renamed over the target with ``os.replace`` and the folder fsync'd. A crash at any
point leaves either the old or the new checkpoint, never a torn one (a stray
``.<name>.*.tmp`` may remain after a crash; it is never read). The file is created with
mode 0666 less the umask, like every other output.

Reading trusts nothing: every tensor of the families above must be float32 by its header
and finite (the thresholds may hold NaN: a layer not yet trained; the second moments must
be >= 0), the four families must name the same tensors with the same shapes, and the
metadata must hold the keys the loaders read, with the right JSON types. Anything else is
a :class:`CheckpointError` naming the file and the tensor or key.
"""
import dataclasses
import json
import math
import os
import secrets

import numpy as np

from .configs import ModelConfig, TrainConfig
from .data import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "rng_from_state",
           "CheckpointError", "FORMAT", "PARAM_FAMILIES", "pack_params", "unpack_params",
           "unpacked_params", "set_thresholds"]

FORMAT = "racedit-checkpoint/1"
# The live weights' routing thresholds, and those recalibrated on the EMA weights.
THRESHOLD_KEYS = ("thresholds", "ema_thresholds")
# Flat-buffer views saved per parameter name: live weights, EMA, AdamW first / second moments.
PARAM_FAMILIES = ("model.", "ema.", "opt.m.", "opt.v.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a racedit checkpoint (names the file)."""


def _fsync_dir(d):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _new_temp(folder, name):
    """Create an empty ``folder/.<name>.<random>.tmp`` with mode 0666 and return (its path,
    its permission bits): the kernel applies the umask, as for any other output, without
    touching the process-wide umask (mkstemp, and safetensors' writer, make 0600)."""
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        try:
            return tmp, os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)


def save_checkpoint(path, tensors, meta):
    """Atomically write ``tensors`` (dict name -> ndarray) and ``meta`` (a JSON-serialisable
    dict) to ``path``. Arrays are stored as they are (made contiguous); the parent folder
    is created if needed. Raises TypeError for a non-array value or unserialisable meta."""
    from safetensors.numpy import save_file

    arrays = {}
    for k, v in tensors.items():
        if not isinstance(v, np.ndarray):
            raise TypeError(f"tensors[{k!r}]: expected a numpy.ndarray, got {type(v).__name__}")
        arrays[k] = np.ascontiguousarray(v)
    header = {"format": FORMAT, "racedit": json.dumps(meta, sort_keys=True)}
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp, mode = _new_temp(folder, os.path.basename(path))
    try:
        save_file(arrays, tmp, metadata=header)
        os.chmod(tmp, mode)  # save_file replaces the file with one of its own (0600)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def load_checkpoint(path, training=True):
    """Read a checkpoint written by :func:`save_checkpoint`: returns (tensors dict name ->
    ndarray, meta dict). FileNotFoundError when missing; CheckpointError (naming the file
    and the tensor or key) when it is not a readable racedit checkpoint, a tensor of
    :data:`PARAM_FAMILIES` or ``thresholds`` is not finite float32, or (``training``, the
    default) the file is not a whole training checkpoint: the four families naming the
    same tensors and the metadata of ``train`` (step, rng, config, model_config, data)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    header, tensors = _read(path)
    if header.get("format") != FORMAT or "racedit" not in header:
        raise CheckpointError(f"{path}: not a racedit checkpoint (format "
                              f"{header.get('format')!r}, expected {FORMAT!r})")
    try:
        meta = json.loads(header["racedit"])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: metadata: expected a JSON object, got "
                              f"{type(meta).__name__}")
    for k, a in tensors.items():
        _check_values(path, k, a)
    if training:
        _check_families(path, tensors)
        _check_meta(path, meta)
    return tensors, meta


def _read(path):
    """(header metadata, tensors) of a safetensors file; the family tensors' header dtype
    is checked before their bytes are read (an I32 header would load as garbage floats)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            tensors = {}
            for k in f.keys():
                dtype = f.get_slice(k).get_dtype()
                if _is_param(k) and dtype != "F32":
                    raise CheckpointError(f"{path}: tensor {k!r}: header dtype {dtype}, "
                                          "expected F32 (float32)")
                tensors[k] = f.get_tensor(k)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return header, tensors


def _is_param(key):
    return key in THRESHOLD_KEYS or key.startswith(PARAM_FAMILIES)


def _check_values(path, key, a):
    """A family tensor must be float32 and finite; thresholds may be NaN (a layer whose
    threshold is not set yet) but not infinite; AdamW's second moments are >= 0."""
    if not _is_param(key):
        return
    if a.dtype != np.float32:
        raise CheckpointError(f"{path}: tensor {key!r}: expected float32, got {a.dtype}")
    flat = a.reshape(-1)
    bad = np.isinf(flat) if key in THRESHOLD_KEYS else ~np.isfinite(flat)
    if bad.any():
        i = int(np.argmax(bad))
        raise CheckpointError(f"{path}: tensor {key!r} holds {flat[i]} at flat index {i} "
                              "(non-finite weights cannot be trained or sampled)")
    if key.startswith("opt.v.") and (flat < 0).any():
        raise CheckpointError(f"{path}: tensor {key!r}: AdamW second moments must be >= 0, "
                              f"got {flat.min()}")
    if key in THRESHOLD_KEYS and a.ndim not in (1, 2):
        raise CheckpointError(f"{path}: tensor {key!r}: expected 1-D or 2-D, got shape "
                              f"{a.shape}")


def _check_families(path, tensors):
    """Every parameter saved in each family, with one shape."""
    names = {k[len("model."):]: a.shape for k, a in tensors.items() if k.startswith("model.")}
    if not names:
        raise CheckpointError(f"{path}: no 'model.*' tensors (not a training checkpoint)")
    for fam in PARAM_FAMILIES[1:]:
        for name, shape in names.items():
            a = tensors.get(fam + name)
            if a is None:
                raise CheckpointError(f"{path}: no tensor {fam + name!r} (model.{name} is saved)")
            if a.shape != shape:
                raise CheckpointError(f"{path}: tensor {fam + name!r} has shape {a.shape}, "
                                      f"model.{name} has {shape}")
        extra = sorted(k for k in tensors if k.startswith(fam) and k[len(fam):] not in names)
        if extra:
            raise CheckpointError(f"{path}: tensor {extra[0]!r} has no model.* counterpart")


# The metadata train._Trainer.save writes: key -> JSON types (None: may be null).
_META = {"step": (int,), "rng": (dict,), "config": (dict,), "model_config": (dict,),
         "data": (dict,)}
_META_OPTIONAL = {"device": (str,), "precision": (str,), "run_dir": (str,),
                  "log_bytes": (int, type(None)), "ept_window": (list,)}
_DATA = {"kind": (str,), "channels": (int,), "image_size": (int,), "num_classes": (int,),
         "class_names": (list,), "source": (str,)}
# config keys read directly (evaluate, sample, the CLI); the rest default to TrainConfig's
_CONFIG_REQUIRED = ("model", "objective", "learn_sigma", "routing", "gating", "plr_weight",
                    "sim_weight", "balance_weight", "beta", "seed", "data", "data_path",
                    "image_size", "num_classes", "num_samples")


def _check_meta(path, meta):
    _check_fields(path, meta, _META, "", required=True)
    _check_fields(path, meta, _META_OPTIONAL, "", required=False)
    _check_fields(path, meta["data"], _DATA, "data.", required=True)
    d = meta["data"]
    for k, hi in (("channels", MAX_CHANNELS), ("image_size", MAX_IMAGE_SIZE),
                  ("num_classes", MAX_CLASSES)):
        if not 1 <= d[k] <= hi:
            raise CheckpointError(f"{path}: metadata 'data.{k}': expected 1..{hi}, got {d[k]}")
    if d["kind"] not in ("pixels", "latents"):
        raise CheckpointError(f"{path}: metadata 'data.kind': expected 'pixels' or 'latents', "
                              f"got {d['kind']!r}")
    if not all(isinstance(c, str) for c in d["class_names"]):
        raise CheckpointError(f"{path}: metadata 'data.class_names': expected strings")
    if meta["step"] < 0:
        raise CheckpointError(f"{path}: metadata 'step': expected >= 0, got {meta['step']}")
    config_types, model_types, model_required = _config_types()
    cfg = meta["config"]
    _check_fields(path, cfg, config_types, "config.", required=False)
    _check_fields(path, cfg, {k: config_types[k] for k in _CONFIG_REQUIRED}, "config.",
                  required=True)
    if cfg.get("model_config") is not None:  # ModelConfig(name=model, **model_config)
        _check_fields(path, cfg["model_config"], model_types, "config.model_config.",
                      required=False, closed=True)
        _check_fields(path, cfg["model_config"], {k: model_types[k] for k in model_required},
                      "config.model_config.", required=True)
    try:
        rng_from_state(meta["rng"])
    except Exception as e:  # numpy raises several types for a bad state
        raise CheckpointError(f"{path}: metadata 'rng' is not a generator state "
                              f"({type(e).__name__}: {e})") from None


def _config_types():
    """JSON types of TrainConfig's and ModelConfig's fields (a None default makes a field
    nullable) and ModelConfig's fields without a default."""

    def types(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if isinstance(f.type, type):  # a typing construct is left unchecked
                t = (int, float) if f.type is float else (f.type,)
                out[f.name] = t + ((type(None),) if f.default is None else ())
        return out

    model = types(ModelConfig)
    model.pop("name")  # the overrides carry no name: it is the config's "model"
    required = [f.name for f in dataclasses.fields(ModelConfig)
                if f.default is dataclasses.MISSING and f.name != "name"]
    return types(TrainConfig), model, required


def _check_fields(path, d, spec, where, required, closed=False):
    """Each ``spec`` key of dict ``d`` has one of its JSON types (bool is not a number here,
    floats are finite); ``required``: all present; ``closed``: no other keys."""
    for k, types in spec.items():
        if k not in d:
            if required:
                raise CheckpointError(f"{path}: metadata has no {where + k!r} "
                                      "(not a training checkpoint?)")
            continue
        v = d[k]
        ok = isinstance(v, types) and (isinstance(v, bool) == (bool in types) or v is None)
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok:
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            got = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
            raise CheckpointError(f"{path}: metadata {where + k!r}: expected {want}, got {got}")
    if closed:
        extra = sorted(set(d) - set(spec))
        if extra:
            raise CheckpointError(f"{path}: metadata {where + extra[0]!r}: unknown key")


def rng_state(rng):
    """A JSON-serialisable copy of a numpy Generator's bit-generator state."""
    return _jsonable(rng.bit_generator.state)


def rng_from_state(state):
    """A numpy Generator restored from :func:`rng_state`'s output (same stream onwards).
    ValueError unless ``state["bit_generator"]`` names a numpy bit generator (any other
    numpy.random attribute, e.g. ``seed``, would be called)."""
    import numpy.random as npr

    cls = getattr(npr, str(state["bit_generator"]), None)
    if not (isinstance(cls, type) and issubclass(cls, npr.BitGenerator)):
        raise ValueError(f"rng: {state['bit_generator']!r} is not a numpy bit generator")
    bg = cls()
    bg.state = state
    return np.random.Generator(bg)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---- a model's buffers as named tensors ------------------------------------------------

def pack_params(model, buf, prefix):
    """Named views ``<prefix><name>`` of a flat buffer laid out like model.param_buffer
    (model.layout: (name, offset, shape) per parameter), for :func:`save_checkpoint`."""
    return {prefix + name: buf[off:off + int(np.prod(shape))].reshape(shape)
            for name, off, shape in model.layout}


def unpack_params(model, tensors, prefix, buf, path):
    """Fill flat ``buf`` (laid out like model.param_buffer) from the checkpoint's
    ``<prefix><name>`` tensors; CheckpointError naming ``path`` for a missing tensor or a
    shape the model does not have."""
    for name, off, shape in model.layout:
        key = prefix + name
        if key not in tensors:
            raise CheckpointError(f"{path}: checkpoint has no tensor {key!r} (another model?)")
        a = tensors[key]
        if a.shape != tuple(shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {a.shape}, the model "
                                  f"expects {tuple(shape)}")
        buf[off:off + a.size] = a.reshape(-1)


def unpacked_params(model, tensors, prefix, path):
    """A new flat float32 buffer filled by :func:`unpack_params` (for the models' setters:
    ``set_param_buffer``, ``set_ema_buffer``, ``load_optimizer_state``)."""
    buf = np.empty(model.num_params(), np.float32)
    unpack_params(model, tensors, prefix, buf, path)
    return buf


def set_thresholds(m, tensors, path="checkpoint", key="thresholds"):
    """Restore the routing thresholds (a NaN row, saved before a layer's first training
    forward, leaves that layer to initialise its thresholds from its next batch).
    Checkpoints from before per-strategy thresholds hold one scalar per layer, (layers,):
    a race model takes it as it is, BL and BE models broadcast it over each layer's E or
    L thresholds (the scalar was learned as the mean of the groups' K-th values, so it
    starts every group there; training refines them), token, expert and LE models have
    no threshold to set (exact top-K at inference)."""
    th = tensors.get(key)
    if th is not None and th.size:
        try:
            m.thresholds = th
        except ValueError as e:  # one per MoE layer
            raise CheckpointError(f"{path}: tensor {key!r} does not fit the model ({e})") from None
