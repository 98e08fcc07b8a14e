"""racedit.diffusion — the two training objectives of docs/method.md §7 and their samplers, in
vectorised NumPy (per-sample coefficients are gathered and broadcast; no loop over
elements or samples).

* ``ddpm`` (:class:`GaussianDiffusion`, as DiT): 1000 steps, linear beta 1e-4..0.02, the
  model predicts the noise eps, MSE loss. With ``learn_sigma`` the model's second half of
  channels interpolates the log-variance between the posterior's and beta's (DiT's
  "learned range"), trained by the variational bound with the mean frozen (DiT's hybrid
  loss). Samplers: DDPM ancestral and DDIM, both on a respaced subset of the steps.
* ``flow`` (:class:`RectifiedFlow`, as SiT): ``x_t = (1-t) x0 + t eps`` with
  ``t ~ logit-normal(0, 1)``, the model predicts the velocity ``v = eps - x0``. Samplers:
  Euler and Heun from t = 1 to 0.

The model sees a *model time* in [0, 1000]: the (original) integer step for ddpm, 1000 t
for flow. Shapes: x0, x_t, noise, target (B, C, H, W); model output (B, C_out, H, W) with
C_out = 2C under learn_sigma; t (B,).

A denoiser for the samplers is any ``fn(x (B,C,H,W) float32, t_model (B,) float32) ->
out (B,C_out,H,W)``; :func:`guided` wraps a class-conditional model with classifier-free
guidance.
"""
import math

import numpy as np

__all__ = [
    "GaussianDiffusion", "RectifiedFlow", "make_objective", "OBJECTIVES", "SAMPLERS",
    "space_timesteps", "guided", "sample", "default_sampler", "default_steps",
]

OBJECTIVES = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler", "heun")}


def _bc(a, ndim):
    """(B,) -> (B, 1, 1, ...) for broadcasting against a (B, ...) tensor of rank ndim."""
    return np.asarray(a).reshape((-1,) + (1,) * (ndim - 1))


def _progress(it, total, progress, desc):
    if not progress:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


def _mse(out, target):
    """Mean squared error over every element and its gradient d loss / d out."""
    diff = out.astype(np.float32) - target.astype(np.float32)
    loss = float(np.mean(np.square(diff, dtype=np.float64)))
    dout = diff * np.float32(2.0 / diff.size)
    return loss, dout


def space_timesteps(num_timesteps, count):
    """The ``count`` evenly spaced steps (0 .. num_timesteps-1, both ends kept) that DiT's
    ``space_timesteps(num_timesteps, str(count))`` keeps. Returns a sorted int64 array."""
    count = int(count)
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"num_sampling_steps: expected 1..{num_timesteps}, got {count}")
    stride = (num_timesteps - 1) / (count - 1) if count > 1 else 1
    return np.unique(np.round(np.arange(count) * stride).astype(np.int64))


class GaussianDiffusion:
    """DDPM with eps prediction (DiT's ``create_diffusion``), all tables float64 (T,).

    num_timesteps: T (1000); beta_start/beta_end: the linear schedule, scaled by 1000/T as
    DiT's ``get_named_beta_schedule("linear", T)``; learn_sigma: the model outputs 2C
    channels (eps, variance interpolation in [-1, 1]); variance: the fixed variance used
    when not learn_sigma, ``"fixed_small"`` (the posterior's, the default) or
    ``"fixed_large"`` (beta; DiT's default for learn_sigma=False).
    """

    name = "ddpm"
    samplers = SAMPLERS["ddpm"]

    def __init__(self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, learn_sigma=False,
                 variance="fixed_small", betas=None, timestep_map=None):
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance: expected 'fixed_small' or 'fixed_large', got {variance!r}")
        if betas is None:
            scale = 1000.0 / num_timesteps
            betas = np.linspace(scale * beta_start, scale * beta_end, num_timesteps,
                                dtype=np.float64)
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas: expected a 1-d array with values in (0, 1]")
        self.learn_sigma = bool(learn_sigma)
        self.variance = variance
        self.num_timesteps = T = betas.shape[0]
        self.timestep_map = (np.arange(T, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, np.int64))
        self.betas = betas                                           # (T,)
        alphas = 1.0 - betas
        self.alphas_cumprod = ac = np.cumprod(alphas)                # (T,)
        self.alphas_cumprod_prev = acp = np.append(1.0, ac[:-1])     # (T,)
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1.0)
        # q(x_{t-1} | x_t, x0)
        self.posterior_variance = pv = betas * (1.0 - acp) / (1.0 - ac)
        # pv[0] is 0: the log is clipped to pv[1] there, as DiT
        self.posterior_log_variance_clipped = np.log(np.append(pv[1], pv[1:]) if T > 1 else
                                                     np.maximum(pv, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(acp) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac)

    # ---- training ----------------------------------------------------------------
    def draw(self, rng, x0):
        """Draw the timestep t (B,) int64 uniform in [0, T) and the noise (like x0, float32)."""
        t = rng.integers(0, self.num_timesteps, size=x0.shape[0], dtype=np.int64)
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        return t, noise

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ac_t) x0 + sqrt(1-ac_t) noise (float32, like x0)."""
        nd = x0.ndim
        a = _bc(self.sqrt_alphas_cumprod[t], nd).astype(np.float32)
        b = _bc(self.sqrt_one_minus_alphas_cumprod[t], nd).astype(np.float32)
        return (a * x0 + b * noise).astype(np.float32)

    def make_batch(self, x0, t, noise):
        """(x_t, target): the noised input and the regression target eps (= noise)."""
        return self.q_sample(x0, t, noise), np.asarray(noise, np.float32)

    def model_time(self, t):
        """The value fed to the model's timestep embedding: the original step (B,) float32."""
        return self.timestep_map[np.asarray(t, np.int64)].astype(np.float32)

    def time_fraction(self, t):
        """t as a fraction of the process in [0, 1) (for bucketing diagnostics)."""
        return self.timestep_map[np.asarray(t, np.int64)] / 1000.0

    def times_at_fraction(self, frac, n):
        """n copies of the step at fraction ``frac`` in [0, 1] of the process, int64 (n,):
        floor(frac T), at most T - 1 (time_fraction's inverse on the training process)."""
        return np.full(n, min(int(frac * self.num_timesteps), self.num_timesteps - 1), np.int64)

    def loss(self, out, target, x0=None, x_t=None, t=None):
        """Loss, its components and d loss / d out (float32 like out).

        Without learn_sigma: the MSE of out against target (eps). With learn_sigma
        (out has 2C channels) the MSE on the first C plus the variational bound term on the
        last C with the predicted mean frozen (DiT's hybrid loss); x0, x_t and t are then
        required. Returns (loss float, {"mse": .., "vb": ..}, dout)."""
        C = target.shape[1]
        if not self.learn_sigma:
            if out.shape != target.shape:
                raise ValueError(f"out: expected shape {target.shape}, got {out.shape}")
            mse, dout = _mse(out, target)
            return mse, {"mse": mse}, dout
        if out.shape[1] != 2 * C or out.shape[0] != target.shape[0]:
            raise ValueError(f"out: expected {2 * C} channels (learn_sigma), got shape {out.shape}")
        if x0 is None or x_t is None or t is None:
            raise ValueError("loss: learn_sigma needs x0, x_t and t")
        eps, var_values = out[:, :C], out[:, C:]
        mse, d_eps = _mse(eps, target)
        vb, d_var = self.vb_loss(var_values, eps, x0, x_t, t)
        dout = np.concatenate([d_eps, d_var.astype(np.float32)], axis=1)
        return mse + vb, {"mse": mse, "vb": vb}, dout

    # ---- the variational bound (learn_sigma) -------------------------------------------
    def _model_log_variance(self, var_values, t):
        """DiT's learned range: log var = frac max_log + (1-frac) min_log, frac = (v+1)/2."""
        nd = var_values.ndim
        min_log = _bc(self.posterior_log_variance_clipped[t], nd)
        max_log = _bc(np.log(self.betas)[t], nd)
        frac = (np.asarray(var_values, np.float64) + 1.0) / 2.0
        return frac * max_log + (1.0 - frac) * min_log, 0.5 * (max_log - min_log)

    def _pred_xstart(self, x_t, t, eps):
        nd = x_t.ndim
        return (_bc(self.sqrt_recip_alphas_cumprod[t], nd) * x_t
                - _bc(self.sqrt_recipm1_alphas_cumprod[t], nd) * eps)

    def _posterior_mean(self, x0, x_t, t):
        nd = x_t.ndim
        return (_bc(self.posterior_mean_coef1[t], nd) * x0
                + _bc(self.posterior_mean_coef2[t], nd) * x_t)

    def vb_loss(self, var_values, eps, x0, x_t, t):
        """The bound term in bits per dimension averaged over the batch, with the mean from
        ``eps`` frozen: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised Gaussian decoder NLL for t = 0 (DiT's ``_vb_terms_bpd``). Returns
        (vb float, d vb / d var_values float64 like var_values)."""
        t = np.asarray(t, np.int64)
        x0 = np.asarray(x0, np.float64)
        x_t = np.asarray(x_t, np.float64)
        nd = x0.ndim
        B = x0.shape[0]
        per = x0[0].size
        true_mean = self._posterior_mean(x0, x_t, t)
        true_logvar = _bc(self.posterior_log_variance_clipped[t], nd)
        model_logvar, dlv_dv = self._model_log_variance(var_values, t)
        model_mean = self._posterior_mean(self._pred_xstart(x_t, t, np.asarray(eps, np.float64)),
                                          x_t, t)
        # KL of two diagonal Gaussians, and its derivative in the second log-variance
        sq = (true_mean - model_mean) ** 2
        ex = np.exp(true_logvar - model_logvar)
        kl = 0.5 * (-1.0 + model_logvar - true_logvar + ex + sq * np.exp(-model_logvar))
        dkl = 0.5 * (1.0 - ex - sq * np.exp(-model_logvar))
        nll, dnll = _discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar)
        dnll = dnll * 0.5  # d log_scale / d logvar
        first = _bc(t == 0, nd)
        term = np.where(first, nll, kl)
        dterm = np.where(first, dnll, dkl)
        scale = 1.0 / (per * math.log(2.0) * B)  # mean over dims (bits), mean over batch
        vb = float(np.sum(term) * scale)
        return vb, dterm * dlv_dv * scale

    # ---- sampling ------------------------------------------------------------------
    def respaced(self, num_steps):
        """A GaussianDiffusion on ``num_steps`` of this one's steps (DiT's SpacedDiffusion):
        betas recomputed from the kept alphas_cumprod, the model fed the original steps."""
        use = space_timesteps(self.num_timesteps, num_steps)
        ac = self.alphas_cumprod[use]
        prev = np.append(1.0, ac[:-1])
        return GaussianDiffusion(betas=1.0 - ac / prev, learn_sigma=self.learn_sigma,
                                 variance=self.variance, timestep_map=self.timestep_map[use])

    def sampler_times(self, sampler="ddpm", num_steps=250):
        """The timesteps t (int64, of this process; ``model_time`` gives what the model is
        fed) at which ``sample`` evaluates the model, in order: the respaced steps from the
        noisiest down to 0 (the same for ddpm and ddim)."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler: ddpm models sample with {self.samplers}, got {sampler!r}")
        use = space_timesteps(self.num_timesteps, num_steps)
        return np.asarray(use[::-1], np.int64)

    def p_mean_variance(self, out, x_t, t, clip_denoised=False):
        """Mean, log-variance and predicted x0 of p(x_{t-1} | x_t) from the model output.
        out (B, C_out, H, W); t (B,) int64 index into this (possibly respaced) process."""
        C = x_t.shape[1]
        nd = x_t.ndim
        out = np.asarray(out, np.float64)
        eps = out[:, :C]
        if self.learn_sigma:
            logvar, _ = self._model_log_variance(out[:, C:2 * C], t)
        elif self.variance == "fixed_small":
            logvar = _bc(self.posterior_log_variance_clipped[t], nd) * np.ones_like(eps)
        else:
            large = np.log(np.append(self.posterior_variance[1], self.betas[1:])
                           if self.num_timesteps > 1 else self.betas)
            logvar = _bc(large[t], nd) * np.ones_like(eps)
        x0 = self._pred_xstart(np.asarray(x_t, np.float64), t, eps)
        if clip_denoised:
            x0 = np.clip(x0, -1.0, 1.0)
        mean = self._posterior_mean(x0, np.asarray(x_t, np.float64), t)
        return mean, logvar, x0

    def ddpm_step(self, out, x_t, i, noise, clip_denoised=False):
        """One ancestral step x_i -> x_{i-1} given the model output at step index i (int)
        and standard normal noise like x_t (unused at i = 0)."""
        t = np.full(x_t.shape[0], i, np.int64)
        mean, logvar, _ = self.p_mean_variance(out, x_t, t, clip_denoised)
        if i == 0:
            return mean.astype(np.float32)
        return (mean + np.exp(0.5 * logvar) * noise).astype(np.float32)

    def ddim_step(self, out, x_t, i, noise=None, eta=0.0, clip_denoised=False):
        """One DDIM step x_i -> x_{i-1} (eta = 0: deterministic)."""
        nd = x_t.ndim
        t = np.full(x_t.shape[0], i, np.int64)
        _, _, x0 = self.p_mean_variance(out, x_t, t, clip_denoised)
        x_t64 = np.asarray(x_t, np.float64)
        eps = ((_bc(self.sqrt_recip_alphas_cumprod[t], nd) * x_t64 - x0)
               / _bc(self.sqrt_recipm1_alphas_cumprod[t], nd))
        ac, acp = self.alphas_cumprod[i], self.alphas_cumprod_prev[i]
        sigma = eta * math.sqrt((1 - acp) / (1 - ac)) * math.sqrt(1 - ac / acp)
        x = x0 * math.sqrt(acp) + math.sqrt(max(1 - acp - sigma ** 2, 0.0)) * eps
        if i > 0 and sigma > 0:
            x = x + sigma * noise
        return x.astype(np.float32)

    def sample(self, fn, x_T, rng, sampler="ddpm", num_steps=250, clip_denoised=False,
               eta=0.0, progress=True):
        """Run a sampler from x_T (B,C,H,W) float32 down to x0 over ``num_steps`` respaced
        steps. fn(x, t_model) -> out; rng: numpy Generator for the ancestral noise."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler: ddpm models sample with {self.samplers}, got {sampler!r}")
        sp = self.respaced(num_steps)
        x = np.asarray(x_T, np.float32)
        B = x.shape[0]
        steps = range(sp.num_timesteps - 1, -1, -1)
        for i in _progress(steps, sp.num_timesteps, progress, sampler):
            out = fn(x, np.full(B, sp.timestep_map[i], np.float32))
            if sampler == "ddpm":
                noise = rng.standard_normal(x.shape, dtype=np.float32) if i > 0 else None
                x = sp.ddpm_step(out, x, i, noise, clip_denoised)
            else:
                noise = (rng.standard_normal(x.shape, dtype=np.float32)
                         if eta > 0 and i > 0 else None)
                x = sp.ddim_step(out, x, i, noise, eta, clip_denoised)
        return x


def _approx_std_normal_cdf(x):
    """DiT's tanh approximation of the standard normal CDF, and its derivative."""
    c = math.sqrt(2.0 / math.pi)
    u = c * (x + 0.044715 * x ** 3)
    th = np.tanh(u)
    return 0.5 * (1.0 + th), 0.5 * (1.0 - th ** 2) * c * (1.0 + 3 * 0.044715 * x ** 2)


def _discretized_gaussian_nll(x, means, log_scales):
    """-log of a Gaussian discretised to 256 bins over [-1, 1] (DiT's decoder NLL, with
    the same clamps), elementwise, and its derivative in log_scales."""
    centered = x - means
    inv_stdv = np.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    cdf_plus, pdf_plus = _approx_std_normal_cdf(plus_in)
    cdf_min, pdf_min = _approx_std_normal_cdf(min_in)
    # d plus_in / d log_scale = -plus_in (likewise for min_in)
    dcdf_plus = -pdf_plus * plus_in
    dcdf_min = -pdf_min * min_in
    lo, one_m = np.maximum(cdf_plus, 1e-12), np.maximum(1.0 - cdf_min, 1e-12)
    delta = cdf_plus - cdf_min
    delta_c = np.maximum(delta, 1e-12)
    log_probs = np.where(x < -0.999, np.log(lo),
                         np.where(x > 0.999, np.log(one_m), np.log(delta_c)))
    g_lo = np.where(cdf_plus > 1e-12, dcdf_plus / lo, 0.0)
    g_one_m = np.where(1.0 - cdf_min > 1e-12, -dcdf_min / one_m, 0.0)
    g_delta = np.where(delta > 1e-12, (dcdf_plus - dcdf_min) / delta_c, 0.0)
    dlog = np.where(x < -0.999, g_lo, np.where(x > 0.999, g_one_m, g_delta))
    return -log_probs, -dlog


class RectifiedFlow:
    """Rectified flow with velocity prediction (SiT's linear path):
    x_t = (1-t) x0 + t eps, target v = eps - x0, t ~ sigmoid(N(mean, std)) (logit-normal).
    learn_sigma: the model's extra C channels are ignored (zero gradient), as SiT does."""

    name = "flow"
    samplers = SAMPLERS["flow"]

    def __init__(self, logit_mean=0.0, logit_std=1.0, learn_sigma=False):
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.learn_sigma = bool(learn_sigma)

    def draw(self, rng, x0):
        """Draw t (B,) float64 in (0, 1), logit-normal, and the noise (like x0, float32)."""
        z = rng.standard_normal(x0.shape[0])
        t = 1.0 / (1.0 + np.exp(-(self.logit_mean + self.logit_std * z)))
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        return t, noise

    def make_batch(self, x0, t, noise):
        """(x_t, target v = noise - x0), float32."""
        tt = _bc(t, x0.ndim).astype(np.float32)
        x_t = (1.0 - tt) * x0 + tt * noise
        return x_t.astype(np.float32), (noise - x0).astype(np.float32)

    def model_time(self, t):
        """1000 t as float32 (B,)."""
        return (np.asarray(t, np.float64) * 1000.0).astype(np.float32)

    def time_fraction(self, t):
        """t itself (in [0, 1])."""
        return np.asarray(t, np.float64)

    def times_at_fraction(self, frac, n):
        """n copies of t = ``frac``, float64 (n,)."""
        return np.full(n, frac, np.float64)

    def loss(self, out, target, x0=None, x_t=None, t=None):
        """MSE of the velocity; returns (loss, {"mse": loss}, dout)."""
        C = target.shape[1]
        if self.learn_sigma:
            if out.shape[1] != 2 * C:
                raise ValueError(f"out: expected {2 * C} channels (learn_sigma), got {out.shape}")
            mse, d = _mse(out[:, :C], target)
            return mse, {"mse": mse}, np.concatenate([d, np.zeros_like(d)], axis=1)
        if out.shape != target.shape:
            raise ValueError(f"out: expected shape {target.shape}, got {out.shape}")
        mse, dout = _mse(out, target)
        return mse, {"mse": mse}, dout

    @staticmethod
    def time_grid(num_steps):
        """The num_steps+1 times 1 -> 0 the ODE solvers visit."""
        return np.linspace(1.0, 0.0, int(num_steps) + 1)

    def sampler_times(self, sampler="euler", num_steps=50):
        """The times t in [0, 1] at which ``sample`` evaluates the model, in order: every
        grid time but the last (Euler), and with Heun also each corrector's t_next but 0."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler: flow models sample with {self.samplers}, got {sampler!r}")
        if int(num_steps) < 1:
            raise ValueError(f"num_sampling_steps: expected >= 1, got {num_steps}")
        ts, out = self.time_grid(num_steps), []
        for t, tn in zip(ts[:-1], ts[1:]):
            out.append(t)
            if sampler == "heun" and tn != 0.0:
                out.append(tn)
        return np.asarray(out, np.float64)

    @staticmethod
    def euler_step(v, x, t, t_next):
        """x + (t_next - t) v."""
        return (x + np.float32(t_next - t) * v).astype(np.float32)

    def sample(self, fn, x_T, rng=None, sampler="euler", num_steps=50, clip_denoised=False,
               eta=0.0, progress=True):
        """Integrate dx/dt = v from t = 1 (x_T, noise) to t = 0 with Euler or Heun.
        Heun corrects every step but the last, which ends on t = 0 where the velocity of
        a clean image is ill-posed (as EDM's sampler): 2 num_steps - 1 evaluations.
        fn(x, t_model) -> out; returns x0 float32."""
        if sampler not in self.samplers:
            raise ValueError(f"sampler: flow models sample with {self.samplers}, got {sampler!r}")
        if int(num_steps) < 1:
            raise ValueError(f"num_sampling_steps: expected >= 1, got {num_steps}")
        x = np.asarray(x_T, np.float32)
        B, C = x.shape[0], x.shape[1]
        ts = self.time_grid(num_steps)

        def vel(x, t):
            return np.asarray(fn(x, np.full(B, 1000.0 * t, np.float32)))[:, :C]

        for j in _progress(range(len(ts) - 1), len(ts) - 1, progress, sampler):
            t, tn = ts[j], ts[j + 1]
            d1 = vel(x, t)
            if sampler == "euler" or tn == 0.0:
                x = self.euler_step(d1, x, t, tn)
            else:
                xe = self.euler_step(d1, x, t, tn)
                d2 = vel(xe, tn)
                x = (x + np.float32(tn - t) * 0.5 * (d1 + d2)).astype(np.float32)
        if clip_denoised:
            x = np.clip(x, -1.0, 1.0)
        return x


def make_objective(name, learn_sigma=False, **kw):
    """The objective called ``name`` ("ddpm" or "flow"); ValueError otherwise."""
    if name == "ddpm":
        return GaussianDiffusion(learn_sigma=learn_sigma, **kw)
    if name == "flow":
        return RectifiedFlow(learn_sigma=learn_sigma, **kw)
    raise ValueError(f"objective: expected one of {OBJECTIVES}, got {name!r}")


def default_sampler(objective):
    """"ddpm" for ddpm models, "euler" for flow models."""
    return {"ddpm": "ddpm", "flow": "euler"}[objective]


def default_steps(sampler):
    """DiT's 250 for the ancestral sampler; 50 for DDIM and Euler; 25 for Heun (50 evals)."""
    return {"ddpm": 250, "ddim": 50, "euler": 50, "heun": 25}[sampler]


def guided(model_fn, y, cfg_scale, null_label):
    """A denoiser ``fn(x, t)`` from a class-conditional ``model_fn(x, t, y)``.

    cfg_scale == 1: plain conditional. Otherwise classifier-free guidance: the batch is
    doubled with the null label and ``out = uncond + s (cond - uncond)`` on all C data
    channels; extra (learned-variance) channels come from the conditional half.
    y: (B,) int labels. The model is called once per step on 2B samples."""
    y = np.asarray(y, np.int64)
    s = float(cfg_scale)
    if s == 1.0:
        return lambda x, t: model_fn(x, t, y)
    null = np.full_like(y, null_label)
    yy = np.concatenate([y, null])

    def fn(x, t):
        B, C = x.shape[0], x.shape[1]
        out = np.asarray(model_fn(np.concatenate([x, x]), np.concatenate([t, t]), yy))
        cond, uncond = out[:B], out[B:]
        g = uncond[:, :C] + np.float32(s) * (cond[:, :C] - uncond[:, :C])
        return np.concatenate([g, cond[:, C:]], axis=1) if out.shape[1] > C else g

    return fn


def sample(objective, fn, shape, rng, sampler=None, num_steps=None, clip_denoised=False,
           progress=True):
    """Draw x_T ~ N(0, I) of ``shape`` (B,C,H,W) from ``rng`` and run the sampler.
    sampler defaults to :func:`default_sampler`, num_steps to :func:`default_steps`."""
    sampler = sampler or default_sampler(objective.name)
    num_steps = num_steps or default_steps(sampler)
    x_T = rng.standard_normal(shape, dtype=np.float32)
    return objective.sample(fn, x_T, rng, sampler=sampler, num_steps=num_steps,
                            clip_denoised=clip_denoised, progress=progress)
