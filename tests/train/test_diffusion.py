"""Objectives and samplers of racedit.diffusion against hand-derived float64 formulas."""
import math

import numpy as np
import pytest

from racedit import diffusion as dd


def _rng(s=0):
    return np.random.default_rng(s)


# ---- the DDPM schedule -------------------------------------------------------------------

def test_linear_schedule():
    g = dd.GaussianDiffusion()
    assert g.num_timesteps == 1000
    assert g.betas[0] == pytest.approx(1e-4) and g.betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(g.betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    ac = 1.0
    for t in (0, 1, 2, 500, 999):
        ac = np.prod(1.0 - g.betas[: t + 1])
        assert g.alphas_cumprod[t] == pytest.approx(ac, rel=1e-12)
        acp = np.prod(1.0 - g.betas[:t])
        beta = g.betas[t]
        # posterior q(x_{t-1} | x_t, x0): variance and mean coefficients
        assert g.posterior_variance[t] == pytest.approx(beta * (1 - acp) / (1 - ac), rel=1e-12)
        assert g.posterior_mean_coef1[t] == pytest.approx(beta * math.sqrt(acp) / (1 - ac))
        assert g.posterior_mean_coef2[t] == pytest.approx(
            (1 - acp) * math.sqrt(1 - beta) / (1 - ac))
    assert g.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)  # the known DiT value
    assert g.posterior_log_variance_clipped[0] == g.posterior_log_variance_clipped[1]


def test_q_sample_and_target():
    g = dd.GaussianDiffusion()
    x0 = _rng().standard_normal((3, 2, 4, 4)).astype(np.float32)
    t, noise = g.draw(_rng(1), x0)
    assert t.dtype == np.int64 and t.shape == (3,) and np.all((t >= 0) & (t < 1000))
    x_t, target = g.make_batch(x0, t, noise)
    for b in range(3):
        ac = g.alphas_cumprod[t[b]]
        np.testing.assert_allclose(x_t[b], math.sqrt(ac) * x0[b] + math.sqrt(1 - ac) * noise[b],
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(target, noise)
    np.testing.assert_array_equal(g.model_time(t), t.astype(np.float32))


def test_draw_is_seeded():
    g = dd.GaussianDiffusion()
    x0 = np.zeros((5, 1, 2, 2), np.float32)
    a = g.draw(_rng(7), x0)
    b = g.draw(_rng(7), x0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_mse_and_gradient():
    g = dd.GaussianDiffusion()
    r = _rng(2)
    out = r.standard_normal((2, 3, 2, 2)).astype(np.float32)
    tgt = r.standard_normal((2, 3, 2, 2)).astype(np.float32)
    loss, parts, dout = g.loss(out, tgt)
    assert loss == pytest.approx(np.mean((out.astype(np.float64) - tgt) ** 2), rel=1e-6)
    np.testing.assert_allclose(dout, 2 * (out - tgt) / out.size, rtol=1e-6)
    assert parts == {"mse": loss}
    with pytest.raises(ValueError, match="out: expected shape"):
        g.loss(out[:, :2], tgt)


# ---- learned variance (DiT's hybrid loss) -------------------------------------------------

def _vb_setup(t):
    g = dd.GaussianDiffusion(learn_sigma=True)
    r = _rng(3)
    B = len(t)
    x0 = np.clip(r.standard_normal((B, 2, 3, 3)), -1, 1)
    x0[0, 0, 0, 0] = -1.0  # edge bins of the decoder likelihood
    x0[0, 0, 0, 1] = 1.0
    noise = r.standard_normal(x0.shape)
    t = np.asarray(t, np.int64)
    x_t = g.q_sample(x0, t, noise).astype(np.float64)
    eps = noise + 0.3 * r.standard_normal(x0.shape)
    v = r.uniform(-0.9, 0.9, x0.shape)
    return g, x0, x_t, t, eps, v


def test_vb_value_matches_hand_kl():
    g, x0, x_t, t, eps, v = _vb_setup([5, 700])
    vb, _ = g.vb_loss(v, eps, x0, x_t, t)
    total = 0.0
    for b in range(2):
        tb = t[b]
        ac, acp, beta = g.alphas_cumprod[tb], g.alphas_cumprod_prev[tb], g.betas[tb]
        mu_q = (beta * math.sqrt(acp) * x0[b] + (1 - acp) * math.sqrt(1 - beta) * x_t[b]) / (1 - ac)
        var_q = beta * (1 - acp) / (1 - ac)
        x0p = (x_t[b] - math.sqrt(1 - ac) * eps[b]) / math.sqrt(ac)
        mu_p = (beta * math.sqrt(acp) * x0p + (1 - acp) * math.sqrt(1 - beta) * x_t[b]) / (1 - ac)
        frac = (v[b] + 1) / 2
        logvar_p = frac * math.log(beta) + (1 - frac) * math.log(var_q)
        var_p = np.exp(logvar_p)
        kl = 0.5 * (math.log(1) + logvar_p - math.log(var_q) + var_q / var_p
                    + (mu_q - mu_p) ** 2 / var_p - 1)
        total += kl.mean() / math.log(2)
    assert vb == pytest.approx(total / 2, rel=1e-9)


@pytest.mark.parametrize("t", [[0, 3], [1, 999], [0, 0]])
def test_vb_gradient_finite_differences(t):
    g, x0, x_t, t, eps, v = _vb_setup(t)
    _, dv = g.vb_loss(v, eps, x0, x_t, t)
    h = 1e-6
    num = np.zeros_like(v)
    flat = v.reshape(-1)
    for i in range(flat.size):
        vp, vm = flat.copy(), flat.copy()
        vp[i] += h
        vm[i] -= h
        num.reshape(-1)[i] = (g.vb_loss(vp.reshape(v.shape), eps, x0, x_t, t)[0]
                              - g.vb_loss(vm.reshape(v.shape), eps, x0, x_t, t)[0]) / (2 * h)
    np.testing.assert_allclose(dv, num, rtol=1e-5, atol=1e-9)


def test_hybrid_loss_output_layout():
    g, x0, x_t, t, eps, v = _vb_setup([4, 10])
    tgt = _rng(9).standard_normal(x0.shape).astype(np.float32)
    out = np.concatenate([eps, v], axis=1).astype(np.float32)
    loss, parts, dout = g.loss(out, tgt, x0=x0, x_t=x_t, t=t)
    assert set(parts) == {"mse", "vb"}
    assert loss == pytest.approx(parts["mse"] + parts["vb"])
    np.testing.assert_allclose(dout[:, :2], 2 * (out[:, :2] - tgt) / tgt.size, rtol=1e-5)
    assert dout.shape == out.shape and np.any(dout[:, 2:] != 0)
    with pytest.raises(ValueError, match="x0, x_t and t"):
        g.loss(out, tgt)
    with pytest.raises(ValueError, match="channels"):
        g.loss(out[:, :2], tgt, x0=x0, x_t=x_t, t=t)


# ---- respacing and the DDPM / DDIM steps -----------------------------------------------------

def _dit_space(num, count):
    """DiT's space_timesteps for one section, written out with its loop."""
    stride = (num - 1) / (count - 1) if count > 1 else 1
    cur, taken = 0.0, []
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


@pytest.mark.parametrize("count", [1, 2, 25, 50, 100, 250, 1000])
def test_space_timesteps_matches_dit(count):
    assert dd.space_timesteps(1000, count).tolist() == _dit_space(1000, count)


def test_space_timesteps_bad():
    with pytest.raises(ValueError, match="num_sampling_steps"):
        dd.space_timesteps(1000, 0)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        dd.space_timesteps(1000, 1001)


def test_respaced_keeps_alphas_cumprod():
    g = dd.GaussianDiffusion()
    sp = g.respaced(50)
    use = dd.space_timesteps(1000, 50)
    np.testing.assert_allclose(sp.alphas_cumprod, g.alphas_cumprod[use], rtol=1e-12)
    np.testing.assert_array_equal(sp.timestep_map, use)
    np.testing.assert_array_equal(sp.model_time(np.array([0, 49])), [0, 999])


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("i", [0, 1, 17, 49])
def test_ddpm_step_hand_formula(variance, i):
    sp = dd.GaussianDiffusion(variance=variance).respaced(50)
    r = _rng(i)
    x = r.standard_normal((2, 3, 4, 4)).astype(np.float32)
    eps = r.standard_normal(x.shape).astype(np.float32)
    z = r.standard_normal(x.shape).astype(np.float32)
    got = sp.ddpm_step(eps, x, i, z)
    beta = sp.betas[i]
    ac = sp.alphas_cumprod[i]
    acp = sp.alphas_cumprod_prev[i]
    # the DDPM paper's mean: (x - beta / sqrt(1 - ac) eps) / sqrt(alpha)
    mean = (x - beta / math.sqrt(1 - ac) * eps.astype(np.float64)) / math.sqrt(1 - beta)
    if i == 0:
        want = mean
    else:
        var = beta * (1 - acp) / (1 - ac) if variance == "fixed_small" else beta
        want = mean + math.sqrt(var) * z
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ddpm_step_learned_range():
    sp = dd.GaussianDiffusion(learn_sigma=True).respaced(10)
    r = _rng(5)
    x = r.standard_normal((1, 1, 2, 2)).astype(np.float32)
    eps = r.standard_normal(x.shape).astype(np.float32)
    v = np.full(x.shape, 0.5, np.float32)
    z = r.standard_normal(x.shape).astype(np.float32)
    i = 4
    got = sp.ddpm_step(np.concatenate([eps, v], 1), x, i, z)
    beta, ac, acp = sp.betas[i], sp.alphas_cumprod[i], sp.alphas_cumprod_prev[i]
    mean = (x - beta / math.sqrt(1 - ac) * eps) / math.sqrt(1 - beta)
    logvar = 0.75 * math.log(beta) + 0.25 * math.log(beta * (1 - acp) / (1 - ac))
    np.testing.assert_allclose(got, mean + math.exp(0.5 * logvar) * z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("i", [0, 3, 24])
def test_ddim_step_hand_formula(i):
    sp = dd.GaussianDiffusion().respaced(25)
    r = _rng(10 + i)
    x = r.standard_normal((2, 3, 4, 4)).astype(np.float32)
    eps = r.standard_normal(x.shape).astype(np.float32)
    got = sp.ddim_step(eps, x, i)
    ac, acp = sp.alphas_cumprod[i], sp.alphas_cumprod_prev[i]
    x0 = (x - math.sqrt(1 - ac) * eps.astype(np.float64)) / math.sqrt(ac)
    want = math.sqrt(acp) * x0 + math.sqrt(1 - acp) * eps
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ddim_clip_denoised():
    sp = dd.GaussianDiffusion().respaced(25)
    x = np.full((1, 1, 1, 1), 5.0, np.float32)
    eps = np.zeros_like(x)
    i = 3
    ac, acp = sp.alphas_cumprod[i], sp.alphas_cumprod_prev[i]
    got = sp.ddim_step(eps, x, i, clip_denoised=True)
    # x0 clipped to 1; eps re-derived from the clipped x0
    e = (x / math.sqrt(ac) - 1.0) / math.sqrt(1 / ac - 1)
    np.testing.assert_allclose(got, math.sqrt(acp) * 1.0 + math.sqrt(1 - acp) * e, rtol=1e-5)


# ---- rectified flow --------------------------------------------------------------------

def test_flow_batch_and_time():
    f = dd.RectifiedFlow()
    x0 = _rng(1).standard_normal((4000, 1, 1, 2)).astype(np.float32)
    t, noise = f.draw(_rng(2), x0)
    assert np.all((t > 0) & (t < 1))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean()) < 0.1 and abs(logit.std() - 1) < 0.1  # logit-normal(0, 1)
    x_t, v = f.make_batch(x0, t, noise)
    tt = t[:, None, None, None]
    np.testing.assert_allclose(x_t, (1 - tt) * x0 + tt * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, noise - x0, rtol=1e-6)
    np.testing.assert_allclose(f.model_time(t), 1000 * t, rtol=1e-6)


def test_flow_learn_sigma_loss_ignores_extra_channels():
    f = dd.RectifiedFlow(learn_sigma=True)
    r = _rng(3)
    out = r.standard_normal((2, 4, 2, 2)).astype(np.float32)
    tgt = r.standard_normal((2, 2, 2, 2)).astype(np.float32)
    loss, _, dout = f.loss(out, tgt)
    assert loss == pytest.approx(np.mean((out[:, :2] - tgt) ** 2.0), rel=1e-6)
    assert np.all(dout[:, 2:] == 0)


def test_euler_and_heun_one_step():
    f = dd.RectifiedFlow()
    r = _rng(4)
    x = r.standard_normal((2, 1, 2, 2)).astype(np.float32)
    A = np.float32(0.7)

    def fn(x, tm):  # v = A x + t (t in [0, 1])
        return A * x + (tm / 1000.0)[:, None, None, None].astype(np.float32)

    got_e = f.sample(fn, x, sampler="euler", num_steps=1, progress=False)
    np.testing.assert_allclose(got_e, x - (A * x + 1.0), rtol=1e-6)
    # Heun: a corrected step 1 -> 0.5, then a plain Euler step onto t = 0
    got_h = f.sample(fn, x, sampler="heun", num_steps=2, progress=False)
    d1 = A * x + 1.0
    xe = x - 0.5 * d1
    d2 = A * xe + 0.5
    xh = x - 0.5 * 0.5 * (d1 + d2)
    np.testing.assert_allclose(got_h, xh - 0.5 * (A * xh + 0.5), rtol=1e-5)
    np.testing.assert_allclose(f.sample(fn, x, sampler="heun", num_steps=1, progress=False),
                               got_e, rtol=1e-6)


# ---- guidance and whole samplers ---------------------------------------------------------------

def test_guided_formula():
    calls = []

    def model(x, t, y):
        calls.append(y.copy())
        return (x + y[:, None, None, None]).astype(np.float32)

    x = np.zeros((2, 3, 1, 1), np.float32)
    fn = dd.guided(model, np.array([1, 2]), 4.0, null_label=10)
    out = fn(x, np.zeros(2, np.float32))
    np.testing.assert_array_equal(calls[-1], [1, 2, 10, 10])
    # uncond 10, cond y: 10 + 4 (y - 10)
    np.testing.assert_allclose(out[:, 0, 0, 0], [10 + 4 * (1 - 10), 10 + 4 * (2 - 10)])
    fn1 = dd.guided(model, np.array([1, 2]), 1.0, null_label=10)
    fn1(x, np.zeros(2, np.float32))
    np.testing.assert_array_equal(calls[-1], [1, 2])


def test_guided_keeps_conditional_variance_channels():
    def model(x, t, y):
        B = x.shape[0]
        return np.concatenate([np.zeros((B, 1, 1, 1)), y[:, None, None, None] + 0.0], 1)

    fn = dd.guided(model, np.array([3]), 2.0, null_label=5)
    out = fn(np.zeros((1, 1, 1, 1), np.float32), np.zeros(1, np.float32))
    assert out.shape == (1, 2, 1, 1) and out[0, 1, 0, 0] == 3


@pytest.mark.parametrize("name,sampler,steps", [("ddpm", "ddpm", 50), ("ddpm", "ddim", 20),
                                                ("flow", "euler", 40), ("flow", "heun", 10)])
def test_oracle_denoiser_recovers_the_point(name, sampler, steps):
    """With a one-point data distribution the ideal model output is known in closed form;
    every sampler must then land on that point."""
    obj = dd.make_objective(name)
    target = np.array([0.5, -0.25, 0.75], np.float32).reshape(1, 3, 1, 1)

    def fn(x, tm):
        if name == "ddpm":
            ac = _bc(obj.alphas_cumprod[tm.astype(np.int64)])
            return ((x - np.sqrt(ac) * target) / np.sqrt(1 - ac)).astype(np.float32)
        t = np.maximum(tm / 1000.0, 1e-3).reshape(-1, 1, 1, 1)
        return ((x - target) / t).astype(np.float32)

    x = dd.sample(obj, fn, (4, 3, 1, 1), _rng(0), sampler=sampler, num_steps=steps,
                  progress=False)
    np.testing.assert_allclose(x, np.broadcast_to(target, x.shape), atol=2e-2)
    again = dd.sample(obj, fn, (4, 3, 1, 1), _rng(0), sampler=sampler, num_steps=steps,
                      progress=False)
    np.testing.assert_array_equal(x, again)


def _bc(a):
    return np.asarray(a).reshape(-1, 1, 1, 1)


def test_bad_objective_and_sampler():
    with pytest.raises(ValueError, match="objective"):
        dd.make_objective("edm")
    with pytest.raises(ValueError, match="sampler"):
        dd.GaussianDiffusion().sample(lambda x, t: x, np.zeros((1, 1, 1, 1), np.float32),
                                      _rng(), sampler="euler", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        dd.RectifiedFlow().sample(lambda x, t: x, np.zeros((1, 1, 1, 1), np.float32),
                                  sampler="ddim", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="variance"):
        dd.GaussianDiffusion(variance="learned")


@pytest.mark.parametrize("name", dd.OBJECTIVES)
def test_times_at_fraction_inverts_time_fraction(name):
    obj = dd.make_objective(name)
    for frac in (0.0, 0.02, 0.5, 0.98, 1.0):
        t = obj.times_at_fraction(frac, 3)
        assert t.shape == (3,) and np.all(t == t[0])
        got = obj.time_fraction(t)
        if name == "flow":
            assert np.all(got == frac)
        else:  # the step floor(frac T), at most T - 1
            assert t.dtype == np.int64 and t[0] == min(int(frac * 1000), 999)
            assert np.all(got <= frac) and np.all(got > frac - 1e-3 - 1e-12)
