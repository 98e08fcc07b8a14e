"""torch is an optional extra: importing racedit (and every module it imports) never
imports torch, whether or not torch is installed."""
from _subproc import run_python

CHILD = """
import sys
import racedit, racedit.moe, racedit.model, racedit.ops, racedit.ref, racedit.cuda
import racedit.checkpoint, racedit.train, racedit.cli
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("ok")
"""


def test_import_racedit_does_not_import_torch():
    r = run_python(["-c", CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
