"""Running Python in a subprocess that imports the same racedit as the tests: the source
tree after an in-place build, site-packages after `pip install`. The child runs outside the
repository root (whose racedit/ has no compiled _C after a pip install) with PYTHONPATH
pointing at the tested package's parent folder."""
import os
import subprocess
import sys
import tempfile

import racedit

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(racedit.__file__)))


def python_env(drop=(), **extra):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


def run_python(args, cwd=None, env_extra=None, env_drop=(), popen=False, **kw):
    """sys.executable with `args` (a list), in `cwd` (default: a temporary folder), with the
    environment less `env_drop` plus `env_extra`."""
    cwd = cwd or tempfile.gettempdir()
    env = python_env(drop=env_drop, **(env_extra or {}))
    if popen:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, **kw)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, **kw)


def run_cli(*args, cwd, check=False, timeout=300):
    """``python -m racedit ARGS`` in ``cwd``, both streams captured as text; with ``check``,
    a non-zero exit is an AssertionError that shows them."""
    p = run_python(["-m", "racedit", *args], cwd=cwd, capture_output=True, text=True,
                   timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p
