/* moe_math.h — vectorisable float32 GELUs for the MoE block's elementwise passes.
 *
 * libm's tanhf and erff are scalar calls the compiler cannot vectorise, and they
 * dominated the passes over the (P,He) and (N,D) activations. These inline versions
 * use only arithmetic, comparisons and one exponent-bit trick, so loops under
 * `#pragma omp simd` vectorise. They are also written without the cancellation of
 * 1 + tanh(u) and 1 + erf(z) for negative inputs:
 *   GELU_tanh(x) = x * sigma(2u),   u = sqrt(2/pi) (x + 0.044715 x^3),
 *   GELU_erf(x)  = x * Phi(x),      Phi(x) = 1 - erfc(z)/2 (x >= 0), erfc(|z|)/2 (x < 0),
 * with z = x/sqrt(2), so the negative tails keep their relative precision.
 * Accuracy (checked against float64 in tests/ops/test_moe_ops.py): exp relative error
 * < 1e-7; erfc relative error < 5e-6 (< 2e-7 absolute); GELUs within a few float32 ulp. */
#ifndef RACEDIT_MOE_MATH_H
#define RACEDIT_MOE_MATH_H

#include <math.h>
#include <stdint.h>

typedef union { float f; int32_t i; } rd_fbits;

/* exp(z) for z <= 0 (inputs below -87 are taken as -87): Cody-Waite reduction
 * z = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor polynomial for e^r, 2^n from the
 * exponent bits. */
static inline float rd_exp_nonpos(float z) {
    z = z < -87.0f ? -87.0f : z;
    float n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = z - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f +
              r * (8.3333338e-3f + r * (1.3888889e-3f + r * 1.9841270e-4f))))));
    rd_fbits b;
    b.i = ((int32_t)n + 127) << 23;
    return p * b.f;
}

#define RD_GELU_T0 0.7978845608028654f /* sqrt(2/pi) */
#define RD_GELU_T1 0.044715f

/* GELU_tanh(x) = 0.5 x (1 + tanh u) = x / (1 + exp(-2u)). */
static inline float rd_gelu_tanh_v(float x) {
    float u = RD_GELU_T0 * (x + RD_GELU_T1 * x * x * x);
    float e = rd_exp_nonpos(-2.0f * fabsf(u)), r = 1.0f / (1.0f + e);
    return x * (u >= 0.0f ? r : e * r);
}

/* d/dx GELU_tanh = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u'(x). */
static inline float rd_gelu_tanh_grad_v(float x) {
    float u = RD_GELU_T0 * (x + RD_GELU_T1 * x * x * x);
    float e = rd_exp_nonpos(-2.0f * fabsf(u)), r = 1.0f / (1.0f + e);
    float half_1pt = u >= 0.0f ? r : e * r;      /* 0.5 (1 + tanh u) */
    float sech2 = 4.0f * e * r * r;              /* 1 - tanh^2 u */
    return half_1pt + 0.5f * x * sech2 * RD_GELU_T0 * (1.0f + 3.0f * RD_GELU_T1 * x * x);
}

/* erfc(t) for t >= 0: 1 - t P(t^2) on [0,1); exp(-t^2) Q(1/(1+t)) beyond, where Q fits
 * erfcx on [1,10] (least squares, relative error 3e-7). */
static inline float rd_erfc_nonneg(float t) {
    float u = t * t;
    float pa = 1.128379107e+00f + u * (-3.761241436e-01f + u * (1.128078848e-01f +
               u * (-2.672698162e-02f + u * (4.934506956e-03f + u * -5.696655717e-04f))));
    float s = 1.0f / (1.0f + t);
    float qb = 5.720582976e-06f + s * (5.639253259e-01f + s * (5.693693757e-01f +
               s * (2.257423699e-01f + s * (9.010730684e-02f + s * (-2.224695921e+00f +
               s * (3.487556458e+00f + s * (-2.256556988e+00f + s * 5.328235030e-01f)))))));
    return t < 1.0f ? 1.0f - t * pa : rd_exp_nonpos(-u) * qb;
}

/* Phi(x), the standard normal CDF. */
static inline float rd_phi_cdf(float x) {
    float c = rd_erfc_nonneg(fabsf(x) * 0.70710678118654752f);
    return x >= 0.0f ? 1.0f - 0.5f * c : 0.5f * c;
}

/* GELU_erf(x) = x Phi(x); its derivative Phi(x) + x phi(x). */
static inline float rd_gelu_erf_v(float x) { return x * rd_phi_cdf(x); }
static inline float rd_gelu_erf_grad_v(float x) {
    return rd_phi_cdf(x) + x * 0.39894228040143268f * rd_exp_nonpos(-0.5f * x * x);
}

#endif
