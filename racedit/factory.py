"""racedit.factory — what a run's settings build: the model (RaceDiT on a device, at a
precision) and the data set of a :class:`racedit.configs.TrainConfig`, new or rebuilt
from a training checkpoint. The trainer, the sampler, the evaluation and the CLI build
them here, so a checkpoint written by any of them loads the same way in all of them.
"""
from .checkpoint import CheckpointError, load_checkpoint, set_thresholds, unpacked_params
from .configs import TrainConfig
from .cuda import require_cuda
from .data import ArrayDataset, LazyDataset, load_data
from .distributed import world
from .model import RaceDiT

__all__ = ["DEVICES", "PRECISIONS", "check_device", "build_model",
           "build_dataset", "load_params", "model_from_checkpoint"]

DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "tf32", "bf16")  # tf32 / bf16: cuda only


def check_device(device, precision):
    """Validate a (device, precision) pair: ValueError for an unknown one, a reduced
    precision on the CPU, or ``device="cuda"`` (the ``--device cuda`` flag) when CUDA is
    not available, saying why (racedit built without CUDA, or no usable device)."""
    if device not in DEVICES + ("check",):  # "check": the checking backend, for the tests
        raise ValueError(f"device: expected one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if device != "cuda" and precision != "fp32":
        raise ValueError(f"precision {precision!r} (--precision) needs device 'cuda' "
                         "(--device cuda); the CPU trains in fp32")
    if device == "cuda":
        try:
            require_cuda()
        except RuntimeError as e:
            raise ValueError(f"device 'cuda' (--device cuda): {e}") from None


def _new_model(device, precision, *args, **kwargs):
    """RaceDiT on ``device``; its GEMMs are bf16 for precision "bf16"."""
    return RaceDiT(*args, device=device, dtype="bf16" if precision == "bf16" else "fp32", **kwargs)


def build_model(cfg, in_channels, input_size, num_classes, device="cpu", precision="fp32"):
    """The RaceDiT that TrainConfig ``cfg`` describes (labels are dropped by the trainer,
    so the model's own dropout is off), on ``device`` ("cpu" | "cuda"; see
    :func:`check_device`) with ``precision`` ("fp32"; on cuda also "tf32" | "bf16")."""
    check_device(device, precision)
    return _new_model(device, precision, cfg.to_model_config(), input_size=input_size,
                      in_channels=in_channels, num_classes=num_classes, seed=cfg.seed,
                      learn_sigma=cfg.learn_sigma, routing=cfg.routing, gating=cfg.gating,
                      plr_weight=cfg.model_plr_weight(), sim_weight=cfg.sim_weight,
                      balance_weight=cfg.balance_weight, beta=cfg.beta, class_dropout_prob=0.0)


def load_params(m, tensors, prefix, path):
    """Set ``m``'s parameters from the checkpoint's ``<prefix><name>`` tensors."""
    m.set_param_buffer(unpacked_params(m, tensors, prefix, path))


def model_from_checkpoint(path, use_ema=True, device="cpu", precision="fp32"):
    """(model, meta) rebuilt from a training checkpoint (written on either device) on
    ``device``; the weights are the EMA's unless use_ema is False. The routing thresholds
    are restored too: with the EMA weights those recalibrated on them (``ema_thresholds``,
    checkpoints that have them), else the live ones. CheckpointError (naming the file) when its contents (checked by
    load_checkpoint) do not describe a model, or its tensors do not fit that model."""
    tensors, meta = load_checkpoint(path)
    check_device(device, precision)
    cfg = TrainConfig.from_dict(meta["config"])
    d = meta["data"]
    try:
        m = build_model(cfg, d["channels"], d["image_size"], d["num_classes"], device, precision)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config does not build a model ({e})") from None
    load_params(m, tensors, "ema." if use_ema else "model.", path)
    set_thresholds(m, tensors, path)                   # both checked against the model
    if use_ema and "ema_thresholds" in tensors:
        set_thresholds(m, tensors, path, "ema_thresholds")
    return m, meta


def build_dataset(cfg, dataset=None):
    """The data set of TrainConfig ``cfg`` (``dataset``, or loaded as cfg says), checked
    against the settings that describe it (num_classes, channels) and the batch size.
    Loaded on a rank of a multi-rank run, folders and latents are read per batch and this
    rank checks its share of the files (racedit.data.load_data's ``shard``)."""
    if dataset is None:
        # channels None: the loader's own (RGB for images)
        extra = {} if cfg.channels is None else {"channels": cfg.channels}
        w = world()
        dataset = load_data(cfg.data, cfg.data_path, image_size=cfg.image_size,
                            num_classes=cfg.num_classes, seed=cfg.seed, n=cfg.num_samples,
                            shard=(w.rank, w.size), **extra)
    if not isinstance(dataset, (ArrayDataset, LazyDataset)):
        raise TypeError("dataset: expected a racedit.data.ArrayDataset or LazyDataset, got "
                        f"{type(dataset).__name__}")
    for key in ("num_classes", "channels"):
        want = getattr(cfg, key)
        if want is not None and want != getattr(dataset, key):
            raise ValueError(f"{key} (--{key.replace('_', '-')}): {want} does not match the "
                             f"data, which has {getattr(dataset, key)} ({dataset.source or cfg.data})")
    if len(dataset) < cfg.global_batch_size:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} exceeds the {len(dataset)} "
                         "samples of the data set")
    return dataset
