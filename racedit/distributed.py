"""racedit.distributed — data-parallel training over MPI (mpi4py) and, on GPUs, NCCL, with
gradient accumulation.

``mpirun -n W python -m racedit train ...`` (or ``srun``) trains one model with W ranks, each
running ``grad_accum`` = A micro-batches per optimizer step; a plain ``python -m racedit
train`` is world size 1 and never imports MPI (mpi4py is imported only when the process was
started by an MPI launcher). ``pip install ".[mpi]"`` brings mpi4py and the MPICH wheel.

The global batch does not depend on the layout: step s's batch is the same B samples for
any W and A; micro-batch j = r*A + a (rank r, accumulation a) is its j-th contiguous slice
of B/(W*A) samples, and its flips, timesteps, noise and label dropout come from a generator
keyed by (seed, step, j). Each micro-batch runs forward, loss and backward on its own
(Expert Race selects its batch top-K within the micro-batch, as on one device); the J = W*A
micro-batch gradients are summed, then scaled by 1/J, before one optimizer step that every
rank takes on identical gradients.

On the CPU the sum is a pairwise tree over j (each rank sums its A gradients pairwise, then
the all-reduce sums the ranks' partial sums); for W and A powers of two the tree is the
same for every layout, and with the all-reduce of two ranks (a + b == b + a exactly) a run
with 2 ranks x A equals 1 rank x 2A bit for bit. MPI does not promise a summation order for
more ranks, so other layouts agree to rounding (about 1e-7 relative per step). On CUDA the
backward accumulates the micro-batch gradients in the model's gradient buffer, which NCCL
all-reduces in place on the device.

The routing thresholds get one update per optimizer step with the mean of the J
micro-batches' batch thresholds tau_b (tau <- beta tau + (1 - beta) mean tau_b); the losses
and routing diagnostics of the log are aggregated over all J micro-batches (loads summed,
MaxVio and dead experts of the summed loads, the rest averaged), the same on every rank.
Rank 0 writes the logs, checkpoints, sample grids and reports. An exception on any rank
prints that rank's message and calls MPI_Abort, which ends every rank.
"""
import contextlib
import os
import sys
import time
import traceback

import numpy as np

__all__ = ["World", "world", "NullLog", "micro_layout", "accum_step", "check_resume",
           "checkpoint_meta", "select_device"]

# Variables an MPI launcher sets to the world size: MPICH / Intel MPI (hydra), Open MPI,
# PMIx launchers and Slurm's srun.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")
_LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")


def launched_size():
    """The world size an MPI launcher announced in the environment; 1 when none did."""
    for var in _SIZE_VARS:
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 1:
            return int(v)
    return 1


class World:
    """The ranks of this job: ``rank``, ``size``, ``local_rank`` (which GPU) and the MPI
    communicator (None for a world of one). Collectives of a world of one are identities."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.local_rank = _local_rank(comm)
        self.is_root = self.rank == 0
        self.comm_seconds = 0.0  # time spent in the gradient all-reduce so far
        self._nccl = None

    def allgather(self, obj):
        """Every rank's ``obj`` (small, pickled), in rank order."""
        return self.comm.allgather(obj) if self.comm is not None else [obj]

    def bcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return self.comm.bcast(obj, root=0) if self.comm is not None else obj

    def allreduce_sum_(self, buf):
        """Sum the float32 array ``buf`` over the ranks, in place."""
        if self.comm is None:
            return buf
        from mpi4py import MPI

        t0 = time.perf_counter()
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.comm_seconds += time.perf_counter() - t0
        return buf

    def abort(self, msg, code=1):
        """Print ``msg`` (naming this rank) and end every rank of the job."""
        print(f"racedit: rank {self.rank}/{self.size}: {msg}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # the launcher forwards output asynchronously: let it take the message
        self.comm.Abort(code)

    @contextlib.contextmanager
    def guard(self):
        """Turn an exception on this rank into the end of the job: the others may be waiting
        in a collective for this one and would never return. A world of one re-raises."""
        try:
            yield
        except BaseException as e:
            if self.comm is None or isinstance(e, SystemExit) and not e.code:
                raise
            if isinstance(e, (ValueError, OSError, RuntimeError)):
                msg = f"{type(e).__name__}: {e}"
            else:
                msg = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            self.abort(msg, 2)

    def nccl(self):
        """The NCCL communicator of the ranks' GPUs, made at the first call (rank 0's unique
        id broadcast over MPI, llm.c's bootstrap)."""
        if self._nccl is None:
            from . import _C

            uid = self.bcast(_C.nccl_unique_id() if self.is_root else None)
            self._nccl = _C.nccl_init(uid, self.size, self.rank)
        return self._nccl


def _local_rank(comm):
    for var in _LOCAL_RANK_VARS:
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    if comm is None:
        return 0
    from mpi4py import MPI

    return comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()


_WORLD = None


def world():
    """This process's World: MPI_COMM_WORLD when an MPI launcher started more than one
    rank, else a world of one (mpi4py not imported). RuntimeError when a launcher started
    several ranks but mpi4py is missing."""
    global _WORLD
    if _WORLD is None:
        n = launched_size()
        if n == 1:
            _WORLD = World()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise RuntimeError(f"started by an MPI launcher with {n} ranks, but mpi4py is "
                                   "not installed: pip install 'racedit[mpi]' (mpi4py and "
                                   "an MPI)") from None
            _WORLD = World(MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None)
    return _WORLD


def select_device(world, device):
    """Give each rank of a multi-rank CUDA run its GPU (local rank -> device, before the
    first allocation); ValueError when racedit has no NCCL to sum the ranks' gradients."""
    if device != "cuda" or world.size == 1:
        return
    from . import _C

    if not _C.nccl_built()[0]:
        raise ValueError(f"device 'cuda' with {world.size} ranks needs NCCL: pip install "
                         "nvidia-nccl-cu13 and rebuild racedit (or train on --device cpu)")
    _C.cuda_select_device(world.local_rank)


class NullLog:
    """The run log of ranks other than 0: they write nothing."""

    def record(self, rec):
        pass

    def line(self, msg, echo=True):
        pass

    def flush(self):
        pass

    def sync(self):
        return None

    def close(self):
        pass


# ---- the layout of a step ------------------------------------------------------------

def micro_layout(batch, world_size, grad_accum):
    """Samples per micro-batch of a global batch ``batch`` split over ``world_size`` ranks
    x ``grad_accum`` accumulations; ValueError when it does not divide."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum (--grad-accum): expected >= 1, got {grad_accum}")
    J = world_size * grad_accum
    if batch % J:
        raise ValueError(f"global_batch_size (--global-batch-size) {batch} is not divisible by "
                         f"{world_size} ranks x grad_accum {grad_accum} = {J} micro-batches")
    return batch // J


def micro_rng(seed, step, j):
    """The generator of micro-batch j of step ``step`` (0-based): flips, timesteps, noise
    and label dropout, the same whatever rank computes it."""
    return np.random.default_rng([seed, 4, step, j])


class _PairwiseSum:
    """Pairwise (tree) summation of arrays pushed in order, holding log2(n) + 1 partial
    sums: equal counts merge as a binary counter carries, earlier + later."""

    def __init__(self):
        self.stack = []  # (count, array)

    def push(self, g):
        n = 1
        while self.stack and self.stack[-1][0] == n:
            c, top = self.stack.pop()
            top += g
            g, n = top, n + c
        self.stack.append((n, g))

    def total(self):
        n, acc = self.stack.pop()
        while self.stack:
            c, top = self.stack.pop()
            top += acc
            acc = top
        return acc


def _micro_forward(tr, j, x0, y):
    """Forward and loss of micro-batch j; (diff, parts, dout, t, x_t)."""
    m, obj = tr.m, tr.obj
    t, y, x_t, target = tr.noised(micro_rng(tr.cfg.seed, tr.step, j), x0, y)
    out = m.forward(x_t, obj.model_time(t), y, plr_target=target if tr.is_moe else None)
    diff, parts, dout = obj.loss(out, target, x0=x0, x_t=x_t, t=t)
    return diff, parts, dout, t, x_t


def _micro_stats(tr, diff, parts, t, layers):
    """What the log needs of the micro-batch just run (small, sent to every rank)."""
    m = tr.m
    s = {"diffusion": float(diff), "parts": {k: float(v) for k, v in parts.items()},
         "aux": float(m.aux_loss())}
    if tr.is_moe:
        s["aux_parts"] = m.aux()
        s["tau_b"] = [st["tau_b"] for st in m.layer_stats()]
        s["ept"] = tr.ept_counts(t)
    if layers:
        s["norms"] = m.branch_norms()
        if tr.is_moe:
            s["layers"] = [{k: st[k] for k in ("load", "combination_usage", "experts_per_token")}
                           for st in m.layer_stats()]
    return s


def _run_micro(tr, j, idx, layers):
    """Forward, loss and backward of micro-batch j (its samples ``idx``); the gradient is
    added to what the model's buffer holds."""
    x0, y = tr.ds.batch(idx)
    try:
        diff, parts, dout, t, x_t = _micro_forward(tr, j, x0, y)
    except ValueError as e:  # the MoE router refuses NaN scores
        if "NaN" not in str(e):
            raise
        raise tr.diverged(f"the forward pass of micro-batch {j} failed ({e})") from None
    s = _micro_stats(tr, diff, parts, t, layers)
    loss = s["diffusion"] + s["aux"]
    if not np.isfinite(loss):
        raise tr.diverged(f"loss of micro-batch {j} is {loss} (diffusion {diff}, aux "
                          f"{s['aux']})", x_t)
    tr.m.backward(dout)
    return s


def _reduce_grads(tr, world, runs):
    """Run this rank's micro-batches (``runs`` yields their stats after each backward) and
    leave the sum over all J micro-batches of their gradients, scaled by 1/J, in the
    model's gradient buffer."""
    m = tr.m
    J = world.size * tr.cfg.grad_accum
    if not m._live:  # device memory: the backward accumulates there; NCCL sums the ranks
        m.zero_grad()
        stats = list(runs(lambda: None))
        if world.size > 1:
            t0 = time.perf_counter()
            from . import _C

            _C.nccl_allreduce_grads(world.nccl(), m._model, 1.0 / J)
            world.comm_seconds += time.perf_counter() - t0
        elif J > 1:
            m.set_grad_buffer(m.grad_buffer * np.float32(1.0 / J))
        return stats
    acc = _PairwiseSum()

    def each():
        acc.push(np.array(m.grad_buffer))
        m.zero_grad()

    m.zero_grad()
    stats = list(runs(each))
    g = world.allreduce_sum_(acc.total())
    g *= np.float32(1.0 / J)
    m.set_grad_buffer(g)
    return stats


def accum_step(tr, world, layers):
    """One optimizer step of the trainer ``tr`` over its rank's grad_accum micro-batches of
    the global batch; returns the step's log record (the same on every rank)."""
    cfg, m = tr.cfg, tr.m
    A = cfg.grad_accum
    b = micro_layout(tr.B, world.size, A)
    idx = tr.batch_indices(tr.step)
    tau0 = m.thresholds if tr.is_moe else None
    c0 = world.comm_seconds

    def runs(after):
        for a in range(A):
            j = world.rank * A + a
            s = _run_micro(tr, j, idx[j * b:(j + 1) * b], layers)
            after()
            yield s

    local = _reduce_grads(tr, world, runs)
    stats = [s for part in world.allgather(local) for s in part]  # j order
    if tr.is_moe:
        m.thresholds = _threshold_update(tau0, [s["tau_b"] for s in stats], cfg.beta)
    lr, opt = tr.opt_settings(tr.step + 1)
    r = m.optimizer_step(**opt)
    if not r["updated"]:
        raise tr.diverged(f"gradient norm is {r['grad_norm']}")
    tr.step += 1
    rec = _record(tr, stats, r["grad_norm"], lr, layers)
    if world.size > 1:
        rec["allreduce_s"] = world.comm_seconds - c0
    return rec


def _threshold_update(tau0, tau_bs, beta):
    """The thresholds after one step: tau <- beta tau + (1 - beta) mean_j tau_b in float32
    (racedit's MoE layer update), tau = mean tau_b for a layer without one yet, unchanged
    where no micro-batch recorded a tau_b (NaN)."""
    tb = np.asarray(tau_bs, np.float64).mean(axis=0).astype(np.float32)
    beta = np.float32(beta)
    upd = beta * tau0 + (np.float32(1) - beta) * tb
    out = np.where(np.isnan(tau0), tb, upd)
    return np.where(np.isnan(tb), tau0, out).astype(np.float32)


def _mean(values):
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if len(vals) == len(values) else None


def _record(tr, stats, gnorm, lr, layers):
    """The step's log record from the J micro-batches' stats (train._Trainer's fields)."""
    diff = float(np.mean([s["diffusion"] for s in stats]))
    aux = float(np.mean([s["aux"] for s in stats]))
    rec = {"step": tr.step, "loss": diff + aux, "diffusion": diff}
    rec.update({k: float(np.mean([s["parts"][k] for s in stats])) for k in stats[0]["parts"]})
    if tr.is_moe:
        rec.update({k: _mean([s["aux_parts"][k] for s in stats]) for k in stats[0]["aux_parts"]})
        rec["aux"] = aux
    rec.update({"grad_norm": gnorm, "lr": lr})
    if tr.is_moe:
        tr._ept += np.sum([s["ept"] for s in stats], axis=0)
    if not layers:
        return rec
    rec["attn_norm"] = np.mean([s["norms"]["attn"] for s in stats], axis=0).tolist()
    rec["ffn_norm"] = np.mean([s["norms"]["ffn"] for s in stats], axis=0).tolist()
    if tr.is_moe:
        rec.update(_routing(stats, tr.m.thresholds))
        sums, cnt = tr._ept
        rec["ept_by_t"] = {str(i): float(sums[i] / cnt[i]) for i in np.flatnonzero(cnt)}
        tr._ept[:] = 0
    return rec


def _routing(stats, tau):
    """Per-layer routing diagnostics of the step: MaxVio and dead experts of the loads
    summed over micro-batches; combination usage and experts per token averaged."""
    rec = {k: [] for k in ("max_violation", "combination_usage", "dead_experts",
                           "experts_per_token")}
    for l in range(len(stats[0]["layers"])):
        load = np.sum([s["layers"][l]["load"] for s in stats], axis=0)
        mean = load.mean()
        rec["max_violation"].append(float((load.max() - mean) / mean) if mean > 0 else 0.0)
        rec["dead_experts"].append(int(np.sum(load == 0)))
        for k in ("combination_usage", "experts_per_token"):
            rec[k].append(float(np.mean([s["layers"][l][k] for s in stats])))
    rec["tau"] = [float(v) for v in tau]
    return rec


# ---- checkpoints ---------------------------------------------------------------------

def checkpoint_meta(world, cfg, rng_state):
    """The layout a checkpoint records (collective: every rank's generator state)."""
    return {"world_size": world.size, "grad_accum": cfg.grad_accum,
            "rng": world.allgather(rng_state)}


def check_resume(meta, cfg, world, path):
    """ValueError unless this run's ranks x grad_accum equals the checkpoint's: another
    product would split the global batch into other micro-batches."""
    d = meta.get("distributed") or {"world_size": 1, "grad_accum": 1}
    old = d["world_size"] * d["grad_accum"]
    new = world.size * cfg.grad_accum
    if old != new:
        raise ValueError(
            f"resume: {path} was trained with {d['world_size']} rank(s) x grad_accum "
            f"{d['grad_accum']} = {old} micro-batches per step; this run has {world.size} "
            f"rank(s) x grad_accum {cfg.grad_accum} = {new}. Resuming needs the same product "
            f"(e.g. --grad-accum {old // world.size if old % world.size == 0 else old} with "
            f"{world.size if old % world.size == 0 else 1} rank(s)), so that every step's "
            "global batch is split into the same micro-batches")


def rank_rng_state(meta, world):
    """This rank's generator state in a checkpoint of the same world size, else rank 0's
    (the generator of a run with micro-batches is keyed by step and not used)."""
    d = meta.get("distributed")
    if d and d["world_size"] == world.size:
        return d["rng"][world.rank]
    return meta["rng"]
