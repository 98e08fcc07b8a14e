"""racedit.ops.route / route_threshold / route_plan against the sort-based twin in
racedit.ref.route: exact K per group, ties to the lower flat index, tau_b, edge values,
determinism, and the errors of bad input."""

from _numerics import STRATEGIES, route_valid
from _subproc import run_python

import numpy as np
import pytest

from racedit import ops, ref

TOPK_AXES = {"token": (2,), "expert": (1,), "bl": (0, 1), "be": (0, 2), "le": (1, 2), "race": (0, 1, 2)}

# (B, L, E, k): odd sizes, E=1, L=1, B=1, k=E, k=0, E not a power of 2
SHAPES = [
    (3, 5, 7, 7), (3, 5, 7, 0), (2, 6, 3, 1), (1, 1, 1, 1), (1, 7, 1, 1), (4, 1, 5, 2),
    (1, 12, 6, 3), (2, 8, 4, 2), (5, 9, 3, 3), (3, 10, 5, 1), (2, 40, 12, 3), (1, 64, 33, 11),
]


CASES = [(B, L, E, k, s) for (B, L, E, k) in SHAPES for s in STRATEGIES
         if route_valid(B, L, E, k, s)]


def group_counts(mask, s):
    """Selected pairs per group: sum over the top-K axes."""
    return mask.sum(axis=TOPK_AXES[s]).ravel()


def check_against_ref(x, k, s):
    mask, tau = ops.route(x, k, s, return_tau=True)
    rmask, rtau = ref.route(x, k, s, return_tau=True)
    assert mask.dtype == np.bool_ and mask.shape == x.shape
    _, K = ops.route_plan(*x.shape, k, s)
    assert (group_counts(mask, s) == K).all()
    np.testing.assert_array_equal(mask, rmask)
    if K == 0:
        assert tau == np.inf and rtau == np.inf
    else:
        np.testing.assert_allclose(tau, rtau, rtol=1e-6, atol=1e-6)
    return mask, tau


def test_every_case_is_exercised():
    assert {c[4] for c in CASES} == set(STRATEGIES)
    assert len(CASES) >= 40


@pytest.mark.parametrize("B,L,E,k,s", CASES)
def test_random_scores_match_ref(B, L, E, k, s):
    rng = np.random.default_rng(B * 1000 + L * 10 + E + k)
    x = rng.standard_normal((B, L, E)).astype(np.float32)
    check_against_ref(x, k, s)


@pytest.mark.parametrize("B,L,E,k,s", CASES)
def test_heavy_ties_go_to_lower_flat_index(B, L, E, k, s):
    rng = np.random.default_rng(7 + B + L + E + k)
    x = rng.integers(0, 3, size=(B, L, E)).astype(np.float32)
    check_against_ref(x, k, s)


@pytest.mark.parametrize("s", STRATEGIES)
def test_all_equal_scores_pick_the_first_indices(s):
    B, L, E, k = 2, 6, 4, 2
    x = np.full((B, L, E), 0.5, np.float32)
    mask = ops.route(x, k, s)
    np.testing.assert_array_equal(mask, ref.route(x, k, s))
    # within each group the selected pairs are the group's first K in flat order
    flat = np.arange(x.size).reshape(x.shape)
    _, K = ops.route_plan(B, L, E, k, s)
    sel = TOPK_AXES[s]
    perm = tuple(a for a in range(3) if a not in sel) + sel
    F = flat.transpose(perm).reshape(-1, int(np.prod([x.shape[a] for a in sel])))
    M = mask.transpose(perm).reshape(F.shape)
    assert (np.diff(F, axis=1) > 0).all()
    assert M[:, :K].all() and not M[:, K:].any()


@pytest.mark.parametrize("s", STRATEGIES)
def test_deterministic(s):
    x = np.random.default_rng(3).integers(0, 4, size=(4, 32, 8)).astype(np.float32)
    a, ta = ops.route(x, 2, s, return_tau=True)
    b, tb = ops.route(x.copy(), 2, s, return_tau=True)
    np.testing.assert_array_equal(a, b)
    assert ta == tb


@pytest.mark.parametrize("s", STRATEGIES)
def test_infinities_and_negative_scores(s):
    rng = np.random.default_rng(11)
    x = -np.abs(rng.standard_normal((3, 8, 4))).astype(np.float32) - 1.0
    x.flat[rng.choice(x.size, 10, replace=False)] = np.inf
    x.flat[rng.choice(x.size, 10, replace=False)] = -np.inf
    mask, _ = check_against_ref(x, 2, s)
    # an +inf beats any finite score of its group, a -inf loses to all of them
    assert mask[x == np.inf].sum() >= 1


def test_all_minus_inf_race():
    x = np.full((2, 4, 4), -np.inf, np.float32)
    mask, tau = ops.route(x, 1, "race", return_tau=True)
    assert mask.ravel()[:8].all() and not mask.ravel()[8:].any()
    assert tau == -np.inf


@pytest.mark.parametrize("s", STRATEGIES)
def test_negative_zero_ties_with_zero(s):
    # -0.0 == 0.0 as floats: a tie, broken by the flat index, never by the sign bit
    rng = np.random.default_rng(5)
    x = np.where(rng.random((2, 8, 4)) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    x[0, 0, :] = -1.0
    assert np.signbit(x).any() and (~np.signbit(x)).any()
    mask, _ = check_against_ref(x, 2, s)
    y = x + np.float32(0.0)  # the same scores with every zero positive (-0 + 0 = +0)
    assert not np.signbit(y[y == 0]).any()
    np.testing.assert_array_equal(mask, ops.route(y, 2, s))


def test_negative_zero_first_wins_race():
    x = np.array([[[-0.0, 0.0, -0.0, 0.0]]], np.float32)
    np.testing.assert_array_equal(ops.route(x, 2, "race"), [[[True, True, False, False]]])
    x = np.array([[[0.0, -0.0, 0.0, -1.0]]], np.float32)
    np.testing.assert_array_equal(ops.route(x, 2, "race"), [[[True, True, False, False]]])


def test_tau_is_mean_kth_value():
    x = np.random.default_rng(2).standard_normal((2, 8, 4)).astype(np.float32)
    _, tau = ops.route(x, 2, "le", return_tau=True)
    kth = [np.sort(x[b].ravel())[::-1][8 * 2 - 1] for b in range(2)]
    np.testing.assert_allclose(tau, np.mean(kth), rtol=1e-6)
    _, tau = ops.route(x, 2, "race", return_tau=True)
    assert tau == np.sort(x.ravel())[::-1][2 * 8 * 2 - 1]


@pytest.mark.parametrize("s", STRATEGIES)
def test_large_case_matches_ref(s):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 256, 64)).astype(np.float32)
    check_against_ref(x, 4, s)
    x = rng.integers(0, 3, (8, 256, 64)).astype(np.float32)
    check_against_ref(x, 4, s)


def test_large_race_ties_under_other_thread_counts():
    # the race group is split across threads; ties must still go to the lowest indices
    code = (
        "import numpy as np; from racedit import ops, ref\n"
        "x = np.random.default_rng(4).integers(0, 5, (8, 256, 64)).astype(np.float32)\n"
        "x[:, :, ::7] = np.inf\n"
        "for k in (1, 4, 9):\n"
        "    m, t = ops.route(x, k, 'race', True); r, rt = ref.route(x, k, 'race', True)\n"
        "    assert (m == r).all() and t == rt, k\n"
        "print('ok')\n"
    )
    for n in ("1", "3", "4"):
        out = run_python(["-c", code], env_extra={"OMP_NUM_THREADS": n}, capture_output=True,
                         text=True)
        assert out.returncode == 0 and "ok" in out.stdout, (n, out.stderr)


def test_converted_inputs():
    x = np.random.default_rng(6).standard_normal((3, 8, 4))
    mask = ops.route(x, 2, "race")  # float64 -> float32
    np.testing.assert_array_equal(mask, ops.route(x.astype(np.float32), 2, "race"))
    xt = np.asfortranarray(x.astype(np.float32))  # non-contiguous layout
    np.testing.assert_array_equal(ops.route(xt, 2, "expert"), ref.route(xt, 2, "expert"))
    xs = x.astype(np.float32)[:, ::2, :]
    np.testing.assert_array_equal(ops.route(xs, 2, "bl"), ref.route(xs, 2, "bl"))


def test_route_plan_table():
    B, L, E, k = 2, 12, 6, 3
    assert ops.route_plan(B, L, E, k, "token") == (B * L, k)
    assert ops.route_plan(B, L, E, k, "expert") == (B * E, k * L // E)
    assert ops.route_plan(B, L, E, k, "bl") == (E, B * L * k // E)
    assert ops.route_plan(B, L, E, k, "be") == (L, B * k)
    assert ops.route_plan(B, L, E, k, "le") == (B, L * k)
    assert ops.route_plan(B, L, E, k, "race") == (1, B * L * k)
    for s in STRATEGIES:
        assert ops.route_plan(B, L, E, k, s) == ref.route_plan(B, L, E, k, s)
    assert ops.route_plan(np.int64(2), 12, 6, np.int32(3), "race") == (1, 72)


# ---- route_threshold -------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (300, 301)])
def test_route_threshold_matches_numpy(shape):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[0] = np.inf
    x.flat[-1] = -0.0
    for tau in (0.3, -0.0, 0.0, float(x.flat[len(x.flat) // 2]), np.inf, -np.inf):
        m = ops.route_threshold(x, tau)
        assert m.dtype == np.bool_ and m.shape == x.shape
        np.testing.assert_array_equal(m, x >= np.float32(tau))
        np.testing.assert_array_equal(m, ref.route_threshold(x, tau))


def test_route_threshold_consistent_with_race_tau():
    x = np.random.default_rng(9).standard_normal((4, 16, 8)).astype(np.float32)
    mask, tau = ops.route(x, 2, "race", return_tau=True)
    np.testing.assert_array_equal(ops.route_threshold(x, tau), mask)  # no ties


# ---- bad input -------------------------------------------------------------------

X = np.zeros((2, 4, 4), np.float32)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (([1.0] * 8, 1, "race"), TypeError, "scores"),
        ((X.astype(np.int32), 1, "race"), TypeError, "scores.*float32"),
        ((X.astype(bool), 1, "race"), TypeError, "scores"),
        ((X[0], 1, "race"), ValueError, "scores.*3-d"),
        ((X[None], 1, "race"), ValueError, "scores.*3-d"),
        ((np.zeros((0, 4, 4), np.float32), 1, "race"), ValueError, "scores.*non-empty"),
        ((np.zeros((2, 4, 0), np.float32), 0, "token"), ValueError, "scores.*non-empty"),
        ((X, 1.0, "race"), TypeError, "k.*int"),
        ((X, True, "race"), TypeError, "k.*int"),
        ((X, np.bool_(True), "race"), TypeError, "k.*int"),
        ((X, "2", "race"), TypeError, "k.*int"),
        ((X, -1, "race"), ValueError, "k.*-1"),
        ((X, 5, "race"), ValueError, "k.*E = 4"),
        ((X, 2**70, "race"), ValueError, "k"),
        ((X, 1, "nope"), ValueError, "strategy.*token, expert, bl, be, le, race"),
        ((X, 1, 5), TypeError, "strategy"),
        ((np.zeros((2, 5, 4), np.float32), 1, "expert"), ValueError, r"k\*L/E.*k=1"),
        ((np.zeros((1, 3, 4), np.float32), 1, "bl"), ValueError, r"B\*L\*k/E.*k=1"),
    ],
)
def test_route_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.route(*args)


@pytest.mark.parametrize("s", STRATEGIES)
def test_route_nan_names_flat_index(s):
    x = np.zeros((2, 4, 4), np.float32)
    x[1, 2, 3] = np.nan
    x[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match=f"scores contains NaN at flat index {1 * 16 + 2 * 4 + 3}"):
        ops.route(x, 1, s)


def test_k_zero_selects_nothing():
    mask, tau = ops.route(X + 1, 0, "race", return_tau=True)
    assert not mask.any() and tau == np.inf


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((2.5, 4, 4, 1, "race"), TypeError, "B.*int"),
        ((2, True, 4, 1, "race"), TypeError, "L.*int"),
        ((2, 4, None, 1, "race"), TypeError, "E.*int"),
        ((2, 4, 4, 1.0, "race"), TypeError, "k.*int"),
        ((0, 4, 4, 1, "race"), ValueError, "B.*>= 1"),
        ((2, 0, 4, 1, "race"), ValueError, "L.*>= 1"),
        ((2, 4, -3, 1, "race"), ValueError, "E.*>= 1"),
        ((2, 4, 4, 7, "race"), ValueError, "k"),
        ((2, 4, 4, 1, "Race"), ValueError, "strategy"),
        ((2, 5, 4, 1, "expert"), ValueError, "k=1"),
    ],
)
def test_route_plan_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.route_plan(*args)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (([0.0, 1.0], 0.5), TypeError, "scores"),
        ((np.zeros(3, np.int64), 0.5), TypeError, "scores.*float32"),
        ((np.float32(1.0), 0.5), TypeError, "scores"),
        ((np.array(1.0, np.float32), 0.5), ValueError, "scores.*ndim"),
        ((np.zeros(3, np.float32), "0.5"), TypeError, "tau"),
        ((np.zeros(3, np.float32), None), TypeError, "tau"),
        ((np.zeros(3, np.float32), True), TypeError, "tau"),
        ((np.zeros(3, np.float32), float("nan")), ValueError, "tau.*NaN"),
        ((np.array([0.0, np.nan, 1.0], np.float32), 0.5), ValueError, "scores contains NaN at flat index 1"),
    ],
)
def test_route_threshold_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        ops.route_threshold(*args)


# ---- the twin itself -------------------------------------------------------------

def test_ref_on_hand_example():
    x = np.array([[[3.0, 1.0], [1.0, 2.0]], [[0.0, 1.0], [5.0, -1.0]]])
    # race, k=1 -> K = B*L*k = 4: 5, 3, 2, then the first 1 (flat index 1)
    expect = np.zeros(8, bool)
    expect[[6, 0, 3, 1]] = True
    np.testing.assert_array_equal(ref.route(x, 1, "race").ravel(), expect)
    # token, k=1: argmax per (b, l), ties to the lower e
    np.testing.assert_array_equal(ref.route(x, 1, "token").ravel(), [1, 0, 0, 1, 0, 1, 1, 0])
    # expert, k=1 -> K = 1 over L per (b, e)
    np.testing.assert_array_equal(ref.route(x, 1, "expert").ravel(), [1, 0, 0, 1, 0, 1, 1, 0])
