"""Random arguments never crash racedit: tests/_fuzz.py calls every racedit.ops and
racedit.cuda entry point, the model and the MoE layer with random arrays and scalars
(wrong ranks, sizes, dtypes, layouts, NaN / inf, wrong kinds and counts) in a subprocess;
each call must return or raise a Python exception. A segfault or abort ends the child
with a non-zero status (faulthandler prints the stack) and fails this test."""
import os

from _subproc import run_python

HERE = os.path.dirname(os.path.abspath(__file__))


def test_random_arguments_never_crash():
    seeds = [str(s) for s in range(12)]
    p = run_python([os.path.join(HERE, "_fuzz.py"), *seeds], capture_output=True, text=True,
                   timeout=600)
    assert p.returncode == 0, f"fuzzing crashed (status {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert p.stdout.count(" ok") == len(seeds), p.stdout
