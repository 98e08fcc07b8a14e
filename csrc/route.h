/* route.h — selection of (token, expert) pairs: the six strategies of docs/method.md §2.
 * Included by racedit.h; see there for conventions. */
#ifndef RACEDIT_ROUTE_H
#define RACEDIT_ROUTE_H

typedef enum {
    RD_ROUTE_TOKEN = 0,   /* groups B*L, top-K over E,     K = k        */
    RD_ROUTE_EXPERT = 1,  /* groups B*E, top-K over L,     K = k*L/E    */
    RD_ROUTE_BL = 2,      /* groups E,   top-K over B*L,   K = B*L*k/E  */
    RD_ROUTE_BE = 3,      /* groups L,   top-K over B*E,   K = B*k      */
    RD_ROUTE_LE = 4,      /* groups B,   top-K over L*E,   K = L*k      */
    RD_ROUTE_RACE = 5     /* 1 group,    top-K over B*L*E, K = B*L*k    */
} rd_strategy;
#define RD_NUM_STRATEGIES 6

const char *rd_strategy_name(rd_strategy s);   /* "token", "expert", "bl", "be", "le", "race" */

/* Number of groups and K per group for a (B,L,E) score tensor with k experts per token
 * on average. RD_EINVAL (message names k and the group) when K is not an integer or
 * not in [0, group size]. */
rd_status rd_route_plan(int64_t *ngroups, int64_t *K, int64_t B, int64_t L, int64_t E,
                        int64_t k, rd_strategy s);

/* mask (B,L,E) <- 1 on exactly K pairs of every group, the K largest scores;
 * ties broken towards the lower flat index (deterministic). Linear-time selection.
 * tau_b (may be NULL) <- mean over groups of each group's K-th largest score
 * (the batch threshold of docs/method.md §3). NaN in scores -> RD_EINVAL. */
rd_status rd_route(uint8_t *mask, float *tau_b, const float *scores /* B,L,E */,
                   int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s);

/* rd_route that also writes kth (ngroups, may be NULL) <- each group's K-th largest
 * score (+inf where K == 0), the per-group batch thresholds. */
rd_status rd_route_kth(uint8_t *mask, float *kth, float *tau_b, const float *scores,
                       int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s);

/* Thresholds of the eval-mode selection of strategy s (docs/method.md §3): E for BL, L for
 * BE, 1 for race (rd_route_plan's groups); 0 for token, expert and LE choice, whose groups
 * lie inside one image and keep their exact top-K at inference. */
int64_t rd_route_num_thresholds(rd_strategy s, int64_t L, int64_t E);

/* mask (B,L,E) <- scores[b,l,e] >= tau[g], g = e (BL), l (BE), 0 (race); tau holds
 * rd_route_num_thresholds(s, L, E) values. RD_EINVAL for a strategy without thresholds,
 * a NaN in tau or in scores. */
rd_status rd_route_thresholds(uint8_t *mask, const float *scores, const float *tau,
                              int64_t B, int64_t L, int64_t E, rd_strategy s);

/* mask (n) <- scores >= tau, per pair (eval-mode selection). */
rd_status rd_route_threshold(uint8_t *mask, const float *scores, int64_t n, float tau);

/* counts (rows, host memory) <- the nonzero bytes of each row of mask (rows, cols): the
 * pairs a selection gave each sample (rows B, cols L*E). */
rd_status rd_mask_row_counts(int64_t *counts, const uint8_t *mask, int64_t rows, int64_t cols);

#endif
