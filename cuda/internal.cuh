/* internal.cuh — launchers shared between the CUDA files without the public entry
 * points' synchronisation: the MoE layer strings them together and reads back once. */
#ifndef RACEDIT_CUDA_INTERNAL_CUH
#define RACEDIT_CUDA_INTERNAL_CUH

#include "common.cuh"

/* Workspace of the radix select (grown on demand). */
typedef struct {
    rd_dbuf hist, sel, chunk_eq, kth;
} rd_route_ws;
void rd_route_ws_free(rd_route_ws *ws);

/* rd_route_cuda without the read-back: atomicMin's the first NaN index into *nan_first
 * (device; the caller presets it to ~0ULL). tau_b is a device float (may be NULL); every
 * group's K-th value is left in ws->kth (ngroups device floats). */
rd_status rd_route_launch(rd_route_ws *ws, uint8_t *mask, float *tau_b, const float *scores,
                          int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s,
                          unsigned long long *nan_first);
/* rd_route_thresholds on the device: mask (B,L,E) = scores >= taus[g] (taus DEVICE,
 * rd_route_num_thresholds values; g = e for BL, l for BE, 0 for race). */
rd_status rd_route_thresholds_launch(uint8_t *mask, const float *scores, const float *taus,
                                     int64_t B, int64_t L, int64_t E, rd_strategy s,
                                     unsigned long long *nan_first);
/* mask = scores >= tau, tau read from tau_dev when not NULL (else the host value). */
rd_status rd_route_threshold_launch(uint8_t *mask, const float *scores, int64_t n,
                                    const float *tau_dev, float tau,
                                    unsigned long long *nan_first);
rd_status rd_nan_scan_launch(unsigned long long *first, const float *x, int64_t n);
/* Reads *first_dev back: RD_EINVAL naming the index when a NaN was seen. */
rd_status rd_nan_check(const unsigned long long *first_dev, const char *op);

/* rd_experts_forward_cuda that also brings back *nan_dev (device, may be NULL) with its
 * one read-back of the counts, into *nan_host. */
rd_status rd_experts_forward_impl(rd_experts_cuda *ex, float *y, const uint8_t *mask,
                                  const float *G, const float *x, const float *W1,
                                  const float *b1, const float *W2, const float *b2,
                                  int64_t N, int64_t D, int64_t E, int64_t He,
                                  const unsigned long long *nan_dev,
                                  unsigned long long *nan_host);

/* The layer's aux losses and diagnostics (moe_aux.cu). launch queues the device work and
 * an async copy of its results after the selection; finish (after the layer's
 * synchronising read-back) computes the values on the host; backward ACCUMULATES the
 * weighted sim / balance gradients into dR_acc and sets *dh_extra to the PLR head's
 * gradient on h (device, owned by the aux state) or NULL; grad's PLR_W / PLR_B accumulate. */
typedef struct rd_moe_aux_cuda rd_moe_aux_cuda;
rd_moe_aux_cuda *rd_moe_aux_cuda_new(void);
void rd_moe_aux_cuda_free(rd_moe_aux_cuda *a);
rd_status rd_moe_aux_cuda_launch(rd_moe_aux_cuda *a, const float *R, const float *h,
                                 const uint8_t *mask, const float *plr_target,
                                 const rd_moe_cfg *cfg, const rd_moe_params *p, int64_t N,
                                 int training);
rd_status rd_moe_aux_cuda_finish(rd_moe_aux_cuda *a);
rd_status rd_moe_aux_cuda_backward(rd_moe_aux_cuda *a, float *dR_acc, const float **dh_extra,
                                   const rd_moe_params *grad, const float *h,
                                   const rd_moe_params *p);
void rd_moe_aux_cuda_read(const rd_moe_aux_cuda *a, rd_moe_aux *out);

#endif
