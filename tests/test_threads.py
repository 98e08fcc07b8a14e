"""One racedit object used from several threads at once: every call works or raises (mostly
RuntimeError "in use by another thread"), never corrupts the heap. tests/_thread_stress.py
runs the threads in a subprocess, so a crash fails the test instead of the test run."""
import json
import os

import pytest

from _subproc import run_python

HERE = os.path.dirname(os.path.abspath(__file__))


def stress(kind, rounds, threads=2):
    p = run_python([os.path.join(HERE, "_thread_stress.py"), kind, str(rounds), str(threads)],
                   capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (f"{kind} stress ended with status {p.returncode}:\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,rounds", [("moe", 300), ("model", 100)])
def test_one_object_many_threads(kind, rounds):
    s = stress(kind, rounds)
    assert s["bad"] == []
    assert s["ok"] >= rounds  # at least one thread finished all its rounds
    assert s["busy"] > 0, "the threads never met inside the object: the test tested nothing"


def test_experts_ops_share_one_workspace_safely():
    """The experts ops keep one workspace for repeated calls; a call arriving while another
    thread uses it gets a fresh one, so nothing is refused."""
    s = stress("experts", 200)
    assert s == {"ok": 400, "busy": 0, "allowed": {}, "bad": []}
