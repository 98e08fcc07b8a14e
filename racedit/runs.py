"""racedit.runs — run folders and their logs.

A run lives in ``<results_dir>/NNN-<model>/`` (DiT's numbered folders): ``config.json``
(the settings and the racedit version and git commit), ``log.txt`` (lines for people),
``log.jsonl`` (a record per step, for machines; :func:`read_log`),
``checkpoints/NNNNNNN.safetensors``, ``samples/`` and the routing reports. The trainer
writes them; the sampler, the CLI's report and the ablation studies find and read them
here.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

from .configs import DATA_SETTINGS

__all__ = ["new_run_dir", "run_folder", "checkpoint_path", "list_checkpoints",
           "latest_checkpoint", "files_after", "check_out_dir", "version_info", "write_config",
           "RunLog", "read_log", "repair_tail"]


# ---- run folders ----------------------------------------------------------------------

def new_run_dir(results_dir, model_name):
    """A new ``<results_dir>/NNN-<model>/`` (one more than the highest number there) with
    its ``checkpoints/`` and ``samples/`` folders."""
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


def checkpoint_path(run_dir, step):
    """``<run_dir>/checkpoints/<step:07d>.safetensors``: where a run saves step ``step``."""
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.safetensors")


def list_checkpoints(folder):
    """[(step, path)] of the ``<step>.safetensors`` files in ``folder``, by step."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(m.group(1)), os.path.join(folder, f)) for f in names
                  if (m := re.fullmatch(r"(\d+)\.safetensors", f)))


def latest_checkpoint(path):
    """``path`` itself for a file; for a run folder, its checkpoint of the highest step
    (``<run>/checkpoints/<step>.safetensors``; a folder of checkpoints works too).
    FileNotFoundError when there is none."""
    if not os.path.isdir(path):
        return path
    folder = os.path.join(path, "checkpoints")
    folder = folder if os.path.isdir(folder) else path
    found = list_checkpoints(folder)
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint (<step>.safetensors) in {folder}")
    return found[-1][1]


def files_after(run_dir, n):
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


def check_out_dir(path, what):
    """ValueError, before any work, when folder ``path`` cannot be created or written: it
    is a file, lies under a file, or its nearest existing ancestor is not writable."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"{what}: {path} cannot be a folder: {p} is a file")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {path}: cannot write in {p} (permission denied)")


def _source_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def version_info():
    """{"racedit_version", "git_commit"}: the commit of the git checkout racedit runs from
    (an editable install or the source tree), None for an installed package."""
    from ._version import __version__

    root, commit = _source_root(), None
    if os.path.exists(os.path.join(root, ".git")):  # a file in a git worktree
        try:
            p = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                               text=True, timeout=10)
            commit = p.stdout.strip() if p.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"racedit_version": __version__, "git_commit": commit or None}


def write_config(run_dir, cfg):
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

class RunLog:
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


def repair_tail(path, out):
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
