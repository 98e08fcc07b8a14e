"""racedit.checkpoint — crash-safe safetensors checkpoints.

A checkpoint is one ``.safetensors`` file (the ``safetensors`` package's NumPy API) holding
named float32/int arrays — for training: the model parameters ``model.<name>``, their EMA
``ema.<name>``, the AdamW moments ``opt.m.<name>`` / ``opt.v.<name>`` and the per-layer
routing thresholds ``thresholds`` — and, in the header metadata, one JSON document (key
``racedit``) with the step, the model/training config and the random generator state.

Writing is atomic: the file is written to a temporary name in the same folder, flushed and
fsync'd, renamed over the target with ``os.replace`` and the folder fsync'd. A crash at any
point leaves either the old or the new checkpoint, never a torn one (a stray
``.<name>.*.tmp`` may remain after a crash; it is never read).
"""
import json
import os
import tempfile

import numpy as np

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "rng_from_state",
           "CheckpointError", "FORMAT"]

FORMAT = "racedit-checkpoint/1"


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
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=header)
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


def load_checkpoint(path):
    """Read a checkpoint written by :func:`save_checkpoint`: returns (tensors dict name ->
    ndarray, meta dict). FileNotFoundError when missing; CheckpointError (naming the file)
    when it is not a readable racedit checkpoint."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        with safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT or "racedit" not in header:
        raise CheckpointError(f"{path}: not a racedit checkpoint (format "
                              f"{header.get('format')!r}, expected {FORMAT!r})")
    try:
        meta = json.loads(header["racedit"])
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt metadata ({e})") from None
    return tensors, meta


def rng_state(rng):
    """A JSON-serialisable copy of a numpy Generator's bit-generator state."""
    return _jsonable(rng.bit_generator.state)


def rng_from_state(state):
    """A numpy Generator restored from :func:`rng_state`'s output (same stream onwards)."""
    import numpy.random as npr

    bg = getattr(npr, state["bit_generator"])()
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
