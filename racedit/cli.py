"""racedit.cli — ``python -m racedit {train,sample,report,ablate,fid,encode}``, flags named
as DiT's train.py / sample.py plus Race-DiT's own (routing, gating, objective, aux-loss
weights).

    python -m racedit train --preset quick                  # the built-in shapes, a few minutes
    python -m racedit train --model RaceDiT-S/2-2in8 --data folder /data/train --steps 100000
    python -m racedit train --resume results/000-.../checkpoints/0001000.safetensors
    python -m racedit sample --ckpt results/000-.../checkpoints/0001500.safetensors --cfg-scale 3
    python -m racedit ablate --study routing --budget small --seeds 0,1,2 --metric both
    python -m racedit fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception weights-inception-2015-12-05-6726825d.pth
    python -m racedit fid --samples samples.npz --ref builtin      # the shapes metric
    python -m racedit encode --data folder /data/train --vae sd-vae-ft-ema --out latents
    python -m racedit sample --ckpt results/003-RaceDiT-B-2-4in32 --vae sd-vae-ft-ema
"""
import argparse
import sys

__all__ = ["main", "build_parser"]


def _add_train(sub):
    from .configs import PLR_OVER_LAYERS, PRESETS
    from .data import DATA_KINDS
    from .diffusion import OBJECTIVES

    p = sub.add_parser("train", help="train a model (DiT's train.py)",
                       description="Train a RaceDiT or DiT. Unset flags take the preset's "
                                   "value, then racedit.TrainConfig's default.")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="a tested setting: 'quick' trains a small RaceDiT on the built-in "
                        "shapes in minutes on 2 CPU cores; imagenet256-* are the paper's "
                        "ImageNet 256x256 models (RaceDiT-*/2-4in32, dense DiT-*/2) with "
                        "--data latents PATH (racedit encode)")
    p.add_argument("--model", help="config name, e.g. RaceDiT-S/2-2in8, DiT-S/2, "
                                   "RaceDiT-B/2-4in32 (any RaceDiT-<size>/<p>-<k>in<E>), or a "
                                   "preset's model (RaceDiT-quick/4-2in8, RaceDiT-tiny/4-2in4)")
    g = p.add_argument_group("model shape", "change the --model's (or preset's) shape, for sizes "
                             "between the table's; the run is then named "
                             "RaceDiT-<depth>x<hidden>/<p>-<k>in<E>")
    g.add_argument("--depth", type=int, help="transformer blocks")
    g.add_argument("--hidden", type=int, help="width D")
    g.add_argument("--heads", type=int, help="attention heads (divide --hidden)")
    g.add_argument("--patch", type=int, help="patch size")
    g.add_argument("--experts", type=int, dest="num_experts", metavar="E",
                   help="experts per MoE layer (0: a dense DiT)")
    g.add_argument("--k", type=int, help="experts per token on average")
    g.add_argument("--expert-hidden", type=int,
                   help="expert width (default 4*hidden/k: the dense DiT's activated FLOPs)")
    p.add_argument("--data", nargs="+", metavar="KIND [PATH]",
                   help=f"training data: {' | '.join(k + ('' if k == 'builtin' else ' PATH') for k in DATA_KINDS)}"
                        " (default builtin)")
    p.add_argument("--data-path", help="image folder in ImageNet layout (same as --data folder PATH)")
    p.add_argument("--num-samples", type=int, help="size of the built-in data set")
    p.add_argument("--image-size", type=int, help="image side in pixels (folders, MNIST)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="image channels: 1 trains grayscale data as one channel (default: "
                        "the data's own, RGB for folders)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the labels); "
                                                   "must match the data's (latents: may exceed it)")
    p.add_argument("--global-batch-size", type=int,
                   help="samples per optimizer step, over all ranks and accumulations")
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per rank per optimizer step (1); the global batch is "
                        "split into ranks x grad_accum micro-batches")
    p.add_argument("--steps", type=int, help="training steps (wins over --epochs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="AdamW learning rate (1e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max gradient L2 norm (0: off)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    p.add_argument("--ema-decay", type=float, help="EMA of the weights (0.9999)")
    p.add_argument("--objective", choices=OBJECTIVES, help="ddpm (eps) or flow (velocity)")
    p.add_argument("--learn-sigma", action="store_true", default=None,
                   help="learn the variance (ddpm; DiT's hybrid loss)")
    p.add_argument("--routing", choices=("race", "token", "expert", "bl", "be", "le"))
    p.add_argument("--gating", choices=("identity", "sigmoid", "softmax"))
    p.add_argument("--plr-weight", type=float, help="per-layer regularization weight (0.01)")
    p.add_argument("--plr-over-layers", choices=PLR_OVER_LAYERS,
                   help="the layers' PLR losses: mean (plr weight / depth each; default) or sum")
    p.add_argument("--sim-weight", type=float, help="router similarity loss weight (0.01)")
    p.add_argument("--balance-weight", type=float, help="balance loss weight (0)")
    p.add_argument("--threshold-beta", type=float, dest="beta",
                   help="EMA factor of the routing thresholds (0.99)")
    p.add_argument("--class-dropout-prob", type=float, help="label dropout for CFG (0.1)")
    p.add_argument("--hflip", action="store_true", default=None, help="random horizontal flips")
    p.add_argument("--seed", type=int)
    p.add_argument("--results-dir", help="where numbered run folders go (results)")
    p.add_argument("--ckpt", help="initialise the weights from this checkpoint (fine-tune)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int,
                   help="a log.txt line and the per-layer statistics in log.jsonl every N steps")
    p.add_argument("--log-layers-every-step", action="store_true", default=None,
                   help="per-layer statistics in every log.jsonl record")
    p.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: off)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale of the samples written")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"))
    p.add_argument("--num-sampling-steps", type=int)
    p.add_argument("--resume", metavar="CKPT",
                   help="continue a run from its checkpoint, in its run folder (or, with "
                        "--results-dir, in a new one there); only --steps, --epochs, the "
                        "--*-every cadences, the sample settings and --grad-accum (keeping ranks x "
                        "grad-accum) may change")
    _add_device(p, "default cpu; on --resume, the run's")
    p.add_argument("--threads", type=int, help="limit OpenMP/BLAS threads (threadpoolctl)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (there is none when stderr is not a terminal)")
    p.add_argument("--no-report", action="store_true", help="skip the routing report")
    return p


def _add_device(p, default):
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help=f"where the model runs ({default}); cuda needs racedit built with "
                        "CUDA and a GPU")
    p.add_argument("--precision", choices=("fp32", "tf32", "bf16"),
                   help="fp32 (default); with --device cuda also tf32 (TF32 GEMMs) or bf16 "
                        "(bf16 GEMM operands with fp32 accumulation, fp32 master weights)")


def _add_sample(sub):
    from .sample import DEFAULT_BATCH, SHARD_SIZE

    p = sub.add_parser("sample", help="sample from a checkpoint (DiT's sample.py / sample_ddp.py)",
                       description="Sample a grid (PNG, optionally .npz) from a checkpoint, or "
                                   "with --num-samples N a resumable .npz of N images for "
                                   "FID (arr_0 N x H x W x C uint8, as ADM's evaluator reads).")
    p.add_argument("--ckpt", required=True,
                   help="a training checkpoint (.safetensors), or a run folder (its latest)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale (1: off)")
    p.add_argument("--num-sampling-steps", type=int,
                   help="default: the run's setting, else 250 ddpm / 50 ddim, euler / 25 heun")
    p.add_argument("--sampler", choices=("ddpm", "ddim", "euler", "heun"),
                   help="ddpm|ddim for ddpm models, euler|heun for flow models")
    p.add_argument("--seed", type=int, default=0,
                   help="sample i draws its noise from (seed, i), whatever the batch size")
    p.add_argument("--class-labels", help="labels to sample, e.g. '0,3,3,7' "
                                          "(default: --per-class of each of the first 10)")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--grid-columns", type=int, help="columns of the PNG grid")
    p.add_argument("--num-samples", type=int,
                   help="mass sampling: N images spread evenly over all classes, written "
                        "in resumable shards and merged into one .npz (no PNG)")
    p.add_argument("--random-labels", action="store_true",
                   help="with --num-samples: uniformly random labels instead")
    p.add_argument("--shard-size", type=int,
                   help=f"with --num-samples: images per shard, the unit of a resume ({SHARD_SIZE})")
    p.add_argument("--out", help="PNG path (default: <run>/samples/sample-<step>-...png); "
                                 "with --num-samples the .npz path")
    p.add_argument("--npz", action="store_true",
                   help="also write the samples as .npz (same base name as the PNG)")
    p.add_argument("--no-ema", action="store_true", help="use the live weights, not the EMA")
    p.add_argument("--batch-size", type=int, help=f"images per model call ({DEFAULT_BATCH}; 2x with guidance)")
    p.add_argument("--threads", type=int, help="limit OpenMP/BLAS threads (threadpoolctl)")
    p.add_argument("--vae", metavar="DIR",
                   help="a latent model's samples decoded by this diffusers AutoencoderKL "
                        "folder (pip install \"racedit[vae]\"): PNG grid and --npz of "
                        "images, and --num-samples for fid")
    _add_device(p, "default cpu")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--no-progress", action="store_true", help="no progress bar")
    bar.add_argument("--progress", action="store_true",
                     help="a progress bar even when stderr is not a terminal")
    return p


def _add_report(sub):
    p = sub.add_parser("report", help="routing report (JSON + PNG) of an MoE checkpoint")
    p.add_argument("--ckpt", required=True, help="a training checkpoint; the report is "
                   "<run>/routing_report-<step>.json and .png (beside a checkpoint kept "
                   "outside a run folder)")
    p.add_argument("--batch", type=int, default=64, help="images per timestep bucket (64)")
    return p


def _add_ablate(sub):
    from .ablate import BUDGETS, METRICS, STUDIES, budgets_help
    from .diffusion import OBJECTIVES

    p = sub.add_parser("ablate", help="run one of the paper's ablation studies",
                       description="Train every run of a study (paired: same data, seeds, "
                                   "steps and activated FLOPs), evaluate the held-out loss "
                                   "(with --metric samples|both also samples) and write a "
                                   "table, plots and a JSON summary. Finished runs are "
                                   "skipped when restarted. " + budgets_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, choices=STUDIES)
    p.add_argument("--budget", default="small", choices=tuple(BUDGETS))
    p.add_argument("--seeds", default="0", help="comma-separated seed indices (0)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", help="study folder (results/ablate-<study>-<budget>)")
    p.add_argument("--threads", type=int, help="limit OpenMP/BLAS threads (threadpoolctl); 1 is "
                                               "fastest for toy/small on a busy machine")
    p.add_argument("--no-progress", action="store_true", help="one line per run, no bar")
    p.add_argument("--objective", default="flow", choices=OBJECTIVES,
                   help="what every run trains: flow (velocity, default) or ddpm (DiT's eps); "
                        "the output folder gets -ddpm appended")
    p.add_argument("--metric", default="loss", choices=METRICS,
                   help="how runs are judged: the held-out loss (default), samples (class "
                        "accuracy and shapes-FD of samples drawn with fixed seeds, labels, "
                        "CFG and eval-mode routing; racedit.shapes_metric) or both")
    return p


def _add_fid(sub):
    from .metrics import DIMS, INCEPTION_URL

    p = sub.add_parser("fid", help="FID, IS, precision/recall of samples (ADM's evaluator)",
                       description="FID, Inception Score and k-NN precision/recall (k=3) of "
                                   "--samples against --ref with torch-fidelity's Inception "
                                   "(pip install \"racedit[eval]\"); prints them and writes "
                                   "JSON. --ref builtin judges built-in shapes samples "
                                   "instead (class accuracy and shapes-FD; NumPy only). "
                                   f"Inception weights: {INCEPTION_URL}")
    p.add_argument("--samples", required=True,
                   help=".npz with arr_0 (N, H, W, C) uint8 (racedit sample --num-samples), "
                        "or an image folder")
    p.add_argument("--ref", required=True,
                   help="image folder, .npz of images (arr_0), statistics .npz (mu, sigma: "
                        "an ADM reference batch or --save-ref's), or 'builtin'")
    p.add_argument("--inception", metavar="PATH",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: "
                        "torch's hub cache; nothing is downloaded)")
    p.add_argument("--dims", type=int, default=2048, choices=DIMS,
                   help="Inception feature layer of FID and precision/recall (2048)")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception call")
    p.add_argument("--image-size", type=int,
                   help="center-crop a reference folder to this side (default: the samples')")
    p.add_argument("--save-ref", metavar="NPZ",
                   help="also write the reference statistics here (reuse them as --ref)")
    p.add_argument("--out", help="JSON path (default <samples>.metrics.json)")
    p.add_argument("--device", default="cpu", help="torch device of the Inception (cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _add_encode(sub):
    p = sub.add_parser("encode", help="encode an image folder to VAE latents for --data latents",
                       description="Encode an ImageNet-layout image folder with a diffusers "
                                   "AutoencoderKL (pip install \"racedit[vae]\") into "
                                   "fast-DiT's latent layout (OUT/features, OUT/labels), "
                                   "scaled by the VAE's scaling factor; resumable.")
    p.add_argument("--data", nargs="+", required=True, metavar="folder PATH",
                   help="the images: folder PATH (ImageNet layout)")
    p.add_argument("--vae", required=True, metavar="DIR",
                   help="AutoencoderKL folder (save_pretrained), e.g. sd-vae-ft-ema")
    p.add_argument("--out", required=True, help="latent folder to write")
    p.add_argument("--image-size", type=int, default=256,
                   help="center-crop side (256: the paper's 32x32x4 latents)")
    p.add_argument("--hflip", action="store_true", help="also encode every image mirrored")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE call")
    p.add_argument("--shard-size", type=int, help="images per output file (1024)")
    p.add_argument("--seed", type=int, default=0, help="seed of the encoder's noise")
    p.add_argument("--device", default="cpu", help="torch device of the VAE (cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fid(args):
    if args.ref == "builtin":
        from .shapes_metric import score_npz

        score_npz(args.samples, out=args.out)
        return 0
    from .metrics import fid

    fid(args.samples, args.ref, inception=args.inception, dims=args.dims,
        batch_size=args.batch_size, device=args.device, image_size=args.image_size,
        save_ref=args.save_ref, out=args.out, progress=not args.no_progress)
    return 0


def _encode(args, ap):
    from .data import parse_data_arg
    from .vae import encode_folder

    try:
        kind, path = parse_data_arg(args.data)
    except ValueError as e:
        ap.error(str(e))
    if kind != "folder":
        ap.error(f"--data: encode reads image folders (--data folder PATH), got {kind}")
    encode_folder(path, args.vae, args.out, image_size=args.image_size, hflip=args.hflip,
                  batch_size=args.batch_size, shard_size=args.shard_size, seed=args.seed,
                  device=args.device, progress=not args.no_progress)
    return 0


def _ablate(args, ap):
    from .ablate import ablate

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    res = ablate(args.study, budget=args.budget, seeds=seeds, device=args.device,
                 out=args.out, progress=not args.no_progress, threads=args.threads,
                 metric=args.metric, objective=args.objective)
    print(res.table)
    return 0


def build_parser():
    """The argparse parser of ``python -m racedit``."""
    ap = argparse.ArgumentParser(prog="python -m racedit",
                                 description="Race-DiT: train and sample diffusion transformers "
                                             "with Expert Race MoE on the CPU (C core) or a CUDA GPU.")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_sample(sub)
    _add_report(sub)
    _add_ablate(sub)
    _add_fid(sub)
    _add_encode(sub)
    return ap


TRAIN_KEYS = ("num_samples", "image_size", "channels", "num_classes", "global_batch_size",
              "grad_accum",
              "steps", "epochs", "lr", "weight_decay", "grad_clip", "warmup_steps", "ema_decay",
              "objective", "learn_sigma", "routing", "gating", "plr_weight", "plr_over_layers",
              "sim_weight", "balance_weight", "beta", "class_dropout_prob", "hflip", "seed",
              "results_dir", "ckpt_every", "log_every", "log_layers_every_step", "sample_every",
              "cfg_scale", "sampler", "num_sampling_steps")
SHAPE_FLAGS = ("depth", "hidden", "heads", "patch", "num_experts", "k", "expert_hidden")


def _train(args, ap):
    from .train import train

    kw = {k: getattr(args, k) for k in TRAIN_KEYS}
    if args.data:
        from .data import parse_data_arg

        try:
            kw["data"], kw["data_path"] = parse_data_arg(args.data)
        except ValueError as e:
            ap.error(str(e))
    elif args.data_path:
        kw["data"], kw["data_path"] = "folder", args.data_path
    shape = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    if shape:
        kw["model_config"] = shape
    if args.resume and args.ckpt:
        ap.error("--resume continues a run; --ckpt starts a new one from its weights: give one")
    res = train(args.model, preset=args.preset, resume=args.resume, init_from=args.ckpt,
                progress=False if args.no_progress else None, report=not args.no_report,
                device=args.device, precision=args.precision, threads=args.threads, **kw)
    if res.rank == 0:
        print(f"racedit: done in {res.wall_time:.1f} s; run folder {res.run_dir}")
    return 0


def _sample(args):
    from .sample import sample

    sample(args.ckpt, class_labels=args.class_labels, per_class=args.per_class,
           cfg_scale=args.cfg_scale, num_sampling_steps=args.num_sampling_steps,
           sampler=args.sampler, seed=args.seed, use_ema=not args.no_ema, out=args.out,
           npz=args.npz, grid_columns=args.grid_columns, vae=args.vae,
           progress="always" if args.progress else not args.no_progress,
           batch_size=args.batch_size, device=args.device or "cpu",
           precision=args.precision or "fp32", num_samples=args.num_samples,
           random_labels=args.random_labels, shard_size=args.shard_size, threads=args.threads)
    return 0


def _report(args):
    import os

    from .configs import TrainConfig
    from .diffusion import make_objective
    from .factory import build_dataset, model_from_checkpoint
    from .report import routing_report
    from .runs import read_log, run_folder

    if args.batch < 1:
        raise ValueError(f"--batch: expected >= 1, got {args.batch}")
    m, meta = model_from_checkpoint(args.ckpt, use_ema=True)
    if not m.config.is_moe:
        print(f"racedit: {m.config.name} is dense: no routing to report", file=sys.stderr)
        return 1
    cfg = TrainConfig.from_dict(meta["config"])
    ds = build_dataset(cfg)
    run = run_folder(args.ckpt)
    records = read_log(os.path.join(run, "log.jsonl"), upto_step=meta["step"],
                       upto_bytes=meta.get("log_bytes")) if run else []
    rep = routing_report(m, None, make_objective(cfg.objective, learn_sigma=cfg.learn_sigma),
                         ds, records, run or os.path.dirname(os.path.abspath(args.ckpt)),
                         seed=cfg.seed, batch=args.batch, step=meta["step"])
    again = " (replacing the earlier report of this step)" if rep["replaced"] else ""
    print(f"racedit: routing report {rep['json']} and {rep['png']}{again}")
    return 0


def _error(e):
    """One line for an expected failure: an OSError as 'path: reason'."""
    if isinstance(e, OSError) and e.strerror:
        names = [n for n in (e.filename, e.filename2) if n is not None]
        return f"{' -> '.join(map(str, names))}: {e.strerror}" if names else e.strerror
    return str(e)


def main(argv=None):
    """Entry point of ``python -m racedit``; returns the exit status. Expected failures
    (bad settings or data, unreadable checkpoints, output folders that cannot be written, a
    full disk, a diverged run) print one line, ``racedit <command>: error: ...``, and exit
    with 2; Ctrl-C exits with 130."""
    from .metrics import MissingExtra
    from .train import TrainingDiverged

    ap = build_parser()
    args = ap.parse_args(argv)
    run = {"train": lambda: _train(args, ap), "sample": lambda: _sample(args),
           "ablate": lambda: _ablate(args, ap), "report": lambda: _report(args),
           "fid": lambda: _fid(args), "encode": lambda: _encode(args, ap)}[args.command]
    try:
        return run()
    except KeyboardInterrupt:
        print(f"racedit {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, MissingExtra, TrainingDiverged) as e:  # DataError, CheckpointError too
        print(f"racedit {args.command}: error: {_error(e)}", file=sys.stderr)
        return 2
