"""Sizes whose products do not fit: every product of sizes in the C core and the binding is
checked, so a huge argument raises ValueError (the count overflows 64 bits) or MemoryError
(more bytes than one allocation can hold) giving the true size, never a wrapped product
that allocates too little and then writes past it. Each call that used to crash runs in a
subprocess, so a regression kills only the child."""
import re

import numpy as np
import pytest

import racedit
from racedit import ops
from _subproc import run_python

CHILD = """
import sys
import numpy as np
import racedit
try:
    {call}
    print("returned")
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
"""


def outcome(call):
    """'<Exception>: <message>' (or 'returned') of `call` run in a fresh interpreter."""
    p = run_python(["-c", CHILD.format(call=call)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{call} crashed (status {p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}"
    return p.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("call,error,sizes", [
    ("racedit.RaceDiT('DiT-S/2', input_size=2**33)", "ValueError", "4294967296 x 4294967296"),
    ("racedit._C.dit_pos_embed(2**32, 2**32, 4)", "ValueError", "4294967296 x 4294967296"),
    ("racedit._C.dit_patchify(np.zeros((1, 1, 0, 0), np.float32), 2**32)", "ValueError",
     "4294967296 x 4294967296 x 1"),
    ("racedit._C.dit_unpatchify(np.zeros((1, 0, 1), np.float32), 1, 2**40, 2**40, 1)",
     "ValueError", "1099511627776 x 1099511627776"),
    ("racedit.MoE(2**20, 2**20, 1, hidden=2**30)", "ValueError", "1048576 x 1048576 x 1073741824"),
])
def test_size_overflow_raises_with_the_true_sizes(call, error, sizes):
    out = outcome(call)
    assert out.startswith(error + ":") and sizes in out, out


def mib(out):
    m = re.search(r"need ([0-9.e+]+) MiB", out)
    assert out.startswith("MemoryError:") and m, out
    return float(m.group(1))


def test_huge_max_batch_reports_its_true_size():
    """max_batch 2**56 .. 2**61: MemoryError at construction with the true arena size,
    which doubles with the batch (a wrapped size printed 0 or negative MiB, or was
    allocated and overrun by the first forward)."""
    call = ("m = racedit.RaceDiT('RaceDiT-T/2-2in4', input_size=8, max_batch={b}); "
            "m.forward(np.zeros((1, 4, 8, 8), np.float32), np.zeros(1), np.zeros(1, int))")
    sizes = [mib(outcome(call.format(b=2**e))) for e in range(56, 62)]
    per_image = sizes[0] / 2**56
    assert per_image > 1e-3  # a T/2 model on 8x8 latents: tens of KiB an image at least
    for e, s in zip(range(56, 62), sizes):
        assert s == pytest.approx(per_image * 2**e, rel=2e-3), (e, s)  # 4 digits printed


def test_route_plan_sizes_beyond_64_bits():
    with pytest.raises(ValueError, match=r"\(4611686018427387904, 4, 4\) has 7.379e\+19 elements"):
        ops.route_plan(2**62, 4, 4, 1, "race")
    with pytest.raises(ValueError, match="more than a 64-bit size"):
        ops.route_plan(2**31, 2**31, 4, 1, "le")


@pytest.mark.parametrize("B,L,E,k,strategy,want", [
    (2**40, 4, 4, 1, "race", (1, 2**42)),
    (2**60, 2, 2, 1, "bl", (2, 2**60)),
    (2**61, 1, 3, 2, "token", (2**61, 2)),
    (2**30, 2**30, 4, 3, "be", (2**30, 3 * 2**30)),
])
def test_route_plan_large_sizes_that_fit(B, L, E, k, strategy, want):
    """Products up to 2**63 - 1 are exact (no sampling of the wrapped value)."""
    assert ops.route_plan(B, L, E, k, strategy) == want

