/* route.c — the six selection strategies of docs/method.md §2.
 *
 * Every strategy is one top-K over groups of the (B,L,E) score tensor. A group is
 * described by an offset and two (count, stride) levels; walking it outer-major gives
 * its elements in ascending flat index, which is the tie-break order. Selection is a
 * radix select on an order-preserving uint32 key of each float: the histogram passes
 * find the key of the K-th largest score (the threshold T) and how many keys are
 * strictly greater; a last pass marks every key > T and the first (K - #greater) keys
 * equal to T in flat-index order. Linear time, no sort. Tiny groups (a token's E
 * experts) use a direct rank count instead, which is cheaper than any histogram.
 * Many groups run in parallel over groups; one huge group (expert race) runs each
 * histogram pass in parallel over chunks, with per-thread histograms merged.
 */
#include "../racedit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static const char *const strategy_names[RD_NUM_STRATEGIES] = {"token", "expert", "bl", "be", "le", "race"};
const char *rd_strategy_name(rd_strategy s) {
    return (unsigned)s < RD_NUM_STRATEGIES ? strategy_names[s] : "?";
}

/* Order-preserving key: for non-NaN floats a > b <=> key(a) > key(b), a == b <=> equal
 * keys. -0.0 is mapped onto +0.0 first because they compare equal as floats (a tie). */
static inline uint32_t f2key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u &= 0u - (uint32_t)((u << 1) != 0);          /* -0.0 -> +0.0 */
    return u ^ ((0u - (u >> 31)) | 0x80000000u);  /* branch-free: signs are random */
}

static inline float key2f(uint32_t k) {
    uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One group: elements off + i1*s1 + i2*s2, i1 < n1, i2 < n2, in ascending flat order. */
typedef struct {
    int64_t off, n1, s1, n2, s2;
} group_t;

static group_t group_of(rd_strategy s, int64_t g, int64_t B, int64_t L, int64_t E) {
    group_t G = {0, 1, 0, 1, 1};
    switch (s) {
    case RD_ROUTE_TOKEN:  G.off = g * E; G.n2 = E; break;                       /* g = b*L+l */
    case RD_ROUTE_EXPERT: G.off = (g / E) * L * E + g % E; G.n2 = L; G.s2 = E; break; /* g = b*E+e */
    case RD_ROUTE_BL:     G.off = g; G.n2 = B * L; G.s2 = E; break;             /* g = e */
    case RD_ROUTE_BE:     G.off = g * E; G.n1 = B; G.s1 = L * E; G.n2 = E; break; /* g = l */
    case RD_ROUTE_LE:     G.off = g * L * E; G.n2 = L * E; break;               /* g = b */
    default:              G.n2 = B * L * E; break;                              /* race */
    }
    return G;
}

/* Flat index of the j-th element of a group. */
static inline int64_t group_at(const group_t *G, int64_t j) {
    return G->off + (j / G->n2) * G->s1 + (j % G->n2) * G->s2;
}

/* Runs the statements after `idx` with `idx` the flat index of elements lo..hi-1 of
 * group G, in order; a contiguous group gets a plain loop the compiler can vectorise.
 * `break` in the body ends the walk. */
#define GROUP_FOR(G, lo, hi, idx, ...)                                                   \
    do {                                                                                 \
        if ((G).s2 == 1 && ((G).n1 == 1 || (G).s1 == (G).n2)) {                          \
            for (int64_t idx = (G).off + (lo); idx < (G).off + (hi); idx++) {            \
                __VA_ARGS__;                                                             \
            }                                                                            \
        } else {                                                                         \
            int64_t i1_ = (lo) / (G).n2, i2_ = (lo) % (G).n2;                            \
            for (int64_t j_ = (lo); j_ < (hi); j_++) {                                   \
                int64_t idx = (G).off + i1_ * (G).s1 + i2_ * (G).s2;                     \
                if (++i2_ == (G).n2) { i2_ = 0; i1_++; }                                 \
                __VA_ARGS__;                                                             \
            }                                                                            \
        }                                                                                \
    } while (0)

rd_status rd_route_plan(int64_t *ngroups, int64_t *K, int64_t B, int64_t L, int64_t E,
                        int64_t k, rd_strategy s) {
    if ((unsigned)s >= RD_NUM_STRATEGIES)
        return rd_fail(RD_EINVAL, "route: strategy must be one of token, expert, bl, be, le, race, got %d", (int)s);
    if (B < 1 || L < 1 || E < 1)
        return rd_fail(RD_EINVAL, "route: scores shape (B, L, E) = (%lld, %lld, %lld) must have B, L, E >= 1",
                       (long long)B, (long long)L, (long long)E);
    if (k < 0 || k > E)
        return rd_fail(RD_EINVAL, "route: k must be in [0, E] = [0, %lld], got k=%lld",
                       (long long)E, (long long)k);
    int64_t BL, BLE; /* every product below is at most B*L*E */
    if (!rd_mul_ok(B, L, &BL) || !rd_mul_ok(BL, E, &BLE))
        return rd_fail(RD_EINVAL, "route: scores shape (B, L, E) = (%lld, %lld, %lld) has %.4g "
                       "elements, more than a 64-bit size counts", (long long)B, (long long)L,
                       (long long)E, (double)B * (double)L * (double)E);
    int64_t num = 0, den = 1, ng = 0, gsize = 0;
    const char *formula = "";
    switch (s) {
    case RD_ROUTE_TOKEN:  ng = B * L; gsize = E;         num = k;         formula = "k"; break;
    case RD_ROUTE_EXPERT: ng = B * E; gsize = L;         num = k * L;     den = E; formula = "k*L/E"; break;
    case RD_ROUTE_BL:     ng = E;     gsize = B * L;     num = B * L * k; den = E; formula = "B*L*k/E"; break;
    case RD_ROUTE_BE:     ng = L;     gsize = B * E;     num = B * k;     formula = "B*k"; break;
    case RD_ROUTE_LE:     ng = B;     gsize = L * E;     num = L * k;     formula = "L*k"; break;
    case RD_ROUTE_RACE:   ng = 1;     gsize = B * L * E; num = B * L * k; formula = "B*L*k"; break;
    }
    if (num % den != 0)
        return rd_fail(RD_EINVAL,
                       "route: strategy '%s' needs K = %s to be an integer, but with k=%lld, "
                       "(B, L, E) = (%lld, %lld, %lld) it is %lld/%lld; choose k so that %s is whole",
                       rd_strategy_name(s), formula, (long long)k, (long long)B, (long long)L,
                       (long long)E, (long long)num, (long long)den, formula);
    if (num / den > gsize)
        return rd_fail(RD_EINVAL, "route: strategy '%s': K = %s = %lld exceeds the group size %lld (k=%lld)",
                       rd_strategy_name(s), formula, (long long)(num / den), (long long)gsize,
                       (long long)k);
    *ngroups = ng;
    *K = num / den;
    return RD_OK;
}

/* ---- radix select --------------------------------------------------------------
 * Digits from the most significant: 4 x 8 bits for small groups (cheap histograms),
 * 11+11+10 bits for large ones (fewer passes). The first pass histograms the scores
 * themselves; the second re-reads them and keeps only the keys in the chosen bucket
 * (while histogramming their next digit), so later passes touch few keys. */
#define HBINS 2048
typedef struct {
    int npass;
    int shift[4], bits[4];
} digits_t;

static digits_t digits_for(int64_t n) {
    digits_t d;
    if (n < 4096) {
        d.npass = 4;
        for (int p = 0; p < 4; p++) { d.shift[p] = 24 - 8 * p; d.bits[p] = 8; }
    } else {
        d.npass = 3;
        d.shift[0] = 21; d.bits[0] = 11;
        d.shift[1] = 10; d.bits[1] = 11;
        d.shift[2] = 0;  d.bits[2] = 10;
    }
    return d;
}

/* NaN keys lie outside [key(-inf), key(+inf)]. */
static inline int key_is_nan(uint32_t k) { return k > 0xff800000u || k < 0x007fffffu; }

/* Given a histogram of one digit among the candidates, picks the digit holding the
 * need-th largest candidate; adds the counts above it to *gt and removes them from *need. */
static uint32_t pick_digit(const int64_t *hist, int nb, int64_t *need, int64_t *gt) {
    int d = nb - 1;
    int64_t acc = 0;
    while (d > 0 && acc + hist[d] < *need) acc += hist[d--];
    *gt += acc;
    *need -= acc;
    return (uint32_t)d;
}

/* One histogram pass p over elements lo..hi-1 of G (p == 0, 1: from the scores) or
 * over the cnt candidate keys in buf (p >= 2); from p == 1 on, keeps in buf only the
 * keys whose digit p-1 is dprev. Returns the new candidate count. */
static int64_t hist_pass(int64_t *h, uint32_t *bad, uint32_t *buf, int64_t cnt,
                         const float *scores, const group_t *G, int64_t lo, int64_t hi,
                         const digits_t *dg, int p, uint32_t dprev) {
    int sh = dg->shift[p];
    uint32_t dm = (1u << dg->bits[p]) - 1;
    memset(h, 0, ((size_t)dm + 1) * sizeof *h);
    if (p == 0) {
        /* Scores cluster in few top-digit buckets: four interleaved histograms keep
         * back-to-back increments of one bucket from waiting on each other. */
        uint32_t h4[4][HBINS], nan = 0, j = 0;
        memset(h4, 0, sizeof h4);
        GROUP_FOR(*G, lo, hi, idx, uint32_t key = f2key(scores[idx]); nan |= key_is_nan(key);
                  h4[j++ & 3][key >> sh]++);
        for (uint32_t i = 0; i <= dm; i++) h[i] = (int64_t)h4[0][i] + h4[1][i] + h4[2][i] + h4[3][i];
        *bad |= nan;
        return 0;
    }
    int psh = dg->shift[p - 1];
    uint32_t pm = (1u << dg->bits[p - 1]) - 1;
    int64_t m = 0;
    if (p == 1) {
        GROUP_FOR(*G, lo, hi, idx, uint32_t key = f2key(scores[idx]);
                  if ((key >> psh) == dprev) { buf[m++] = key; h[(key >> sh) & dm]++; });
    } else {
        for (int64_t j = 0; j < cnt; j++) {
            uint32_t key = buf[j];
            if (((key >> psh) & pm) == dprev) { buf[m++] = key; h[(key >> sh) & dm]++; }
        }
    }
    return m;
}

/* Marks elements lo..hi-1 of group G: score > T, and the first `take` of the `eq`
 * scores equal to T (compared as floats, so -0.0 ties with 0.0 as in the keys). */
static void mark_range(uint8_t *mask, const float *scores, const group_t *G, int64_t lo,
                       int64_t hi, float T, int64_t take, int64_t eq) {
    if (take == eq) {
        GROUP_FOR(*G, lo, hi, idx, mask[idx] = scores[idx] >= T);
        return;
    }
    GROUP_FOR(*G, lo, hi, idx, mask[idx] = scores[idx] > T);
    if (take > 0)
        GROUP_FOR(*G, lo, hi, idx, if (scores[idx] == T) { mask[idx] = 1; if (--take == 0) break; });
}

/* Top-K of a group of n <= SMALL elements: an element is selected when fewer than K
 * elements rank above it (greater, or equal with a lower index). Returns nonzero on NaN. */
#define SMALL 32
static int select_small(uint8_t *mask, float *kth, const float *scores, const group_t *G,
                        int64_t n, int64_t K) {
    uint32_t key[SMALL], bad = 0;
    int64_t idx[SMALL];
    for (int64_t j = 0; j < n; j++) {
        idx[j] = group_at(G, j);
        key[j] = f2key(scores[idx[j]]);
        bad |= key_is_nan(key[j]);
    }
    if (bad) return 1;
    for (int64_t j = 0; j < n; j++) {
        int64_t rank = 0;
        for (int64_t i = 0; i < n; i++) rank += key[i] > key[j] || (key[i] == key[j] && i < j);
        mask[idx[j]] = rank < K;
        if (rank == K - 1) *kth = key2f(key[j]);
    }
    return 0;
}

/* Top-K (1 <= K <= n) of one group on one thread; buf holds n keys. Writes the K-th
 * largest score to *kth. Returns nonzero when the group holds a NaN. */
static int select_group(uint8_t *mask, float *kth, const float *scores, const group_t *G,
                        int64_t n, int64_t K, uint32_t *buf) {
    if (n <= SMALL) return select_small(mask, kth, scores, G, n, K);
    digits_t dg = digits_for(n);
    int64_t hist[HBINS], need = K, gt = 0, cnt = 0;
    uint32_t T = 0, d = 0, bad = 0;
    for (int p = 0; p < dg.npass; p++) {
        cnt = hist_pass(hist, &bad, buf, cnt, scores, G, 0, n, &dg, p, d);
        if (bad) return 1;
        d = pick_digit(hist, 1 << dg.bits[p], &need, &gt);
        T |= d << dg.shift[p];
    }
    *kth = key2f(T);
    mark_range(mask, scores, G, 0, n, *kth, need, hist[d]);
    return 0;
}

#ifdef _OPENMP
/* Top-K of one large group with all threads: each thread owns a contiguous chunk of
 * the group (in element order) and its slice of buf, where it compacts its own
 * candidates; per-thread histograms are merged by one thread between passes. Ties
 * equal to T are handed out to the chunks in chunk order, so the lowest flat indices
 * win exactly as in the serial code. Returns -1 on allocation failure, 1 on NaN. */
static int select_group_parallel(uint8_t *mask, float *kth, const float *scores,
                                 const group_t *G, int64_t n, int64_t K, uint32_t *buf) {
    int nt = omp_get_max_threads();
    int64_t *hists = malloc((size_t)nt * HBINS * sizeof *hists);
    int64_t *eq = malloc((size_t)nt * sizeof *eq);
    int64_t tot[HBINS];
    if (!hists || !eq) { free(hists); free(eq); return -1; }
    digits_t dg = digits_for(n);
    int64_t need = K, gt = 0;
    uint32_t T = 0, d = 0, bad = 0;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), tn = omp_get_num_threads();
        int64_t lo = n * t / tn, hi = n * (t + 1) / tn, cnt = 0;
        int64_t *h = hists + (size_t)t * HBINS;
        uint32_t mybad = 0;
        for (int p = 0; p < dg.npass; p++) {
            cnt = hist_pass(h, &mybad, buf + lo, cnt, scores, G, lo, hi, &dg, p, d);
            if (mybad) {
#pragma omp atomic
                bad |= mybad;
            }
#pragma omp barrier
#pragma omp single
            {
                int nb = 1 << dg.bits[p];
                memcpy(tot, hists, (size_t)nb * sizeof *tot);
                for (int u = 1; u < tn; u++)
                    for (int i = 0; i < nb; i++) tot[i] += hists[(size_t)u * HBINS + i];
                d = pick_digit(tot, nb, &need, &gt);
                T |= d << dg.shift[p];
            } /* implicit barrier: all see d, T and bad */
            if (bad) break;
        }
        if (!bad) {
            eq[t] = h[d]; /* this chunk's keys equal to T */
#pragma omp barrier
            int64_t before = 0;
            for (int u = 0; u < t; u++) before += eq[u];
            int64_t take = need - before;
            take = take < 0 ? 0 : (take > eq[t] ? eq[t] : take);
            mark_range(mask, scores, G, lo, hi, key2f(T), take, eq[t]);
        }
    }
    free(hists);
    free(eq);
    *kth = key2f(T);
    return bad ? 1 : 0;
}
#endif

static rd_status nan_error(const char *op, const float *scores, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (isnan(scores[i]))
            return rd_fail(RD_EINVAL, "%s: scores contains NaN at flat index %lld", op, (long long)i);
    return RD_OK;
}

static rd_status check_nan(const char *op, const float *scores, int64_t n) {
    int bad = 0;
#pragma omp parallel for reduction(| : bad) if (n > 65536)
    for (int64_t i = 0; i < n; i++) bad |= scores[i] != scores[i];
    return bad ? nan_error(op, scores, n) : RD_OK;
}

/* tau_b: groups with K == 0 select nothing and define no threshold; K is the same for
 * every group, so then tau_b = +inf (no finite score passes it), and so is every kth. */
rd_status rd_route_kth(uint8_t *mask, float *kth_out, float *tau_b, const float *scores,
                       int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s) {
    int64_t ng, K;
    rd_status st = rd_route_plan(&ng, &K, B, L, E, k, s);
    if (st != RD_OK) return st;
    int64_t total = B * L * E;
    if (K == 0) {
        if ((st = check_nan("route", scores, total)) != RD_OK) return st;
        memset(mask, 0, (size_t)total);
        if (tau_b) *tau_b = INFINITY;
        for (int64_t g = 0; kth_out && g < ng; g++) kth_out[g] = INFINITY;
        return RD_OK;
    }
    int64_t gsize = total / ng;
    float *kth = kth_out ? kth_out : malloc((size_t)ng * sizeof *kth);
    if (!kth) return rd_fail(RD_ENOMEM, "route: out of memory for %lld group thresholds", (long long)ng);
    int nt = rd_num_threads(), bad = 0;
    uint32_t *buf = NULL;
#ifdef _OPENMP
    if (ng < nt && gsize >= 32768) { /* few huge groups: all threads inside each group */
        buf = malloc((size_t)gsize * sizeof *buf);
        if (!buf) goto oom;
        for (int64_t g = 0; g < ng && !bad; g++) {
            group_t G = group_of(s, g, B, L, E);
            bad = select_group_parallel(mask, &kth[g], scores, &G, gsize, K, buf);
            if (bad < 0) goto oom;
        }
        goto done;
    }
#endif
    {
        int use = (ng > 1 && total >= 16384) ? nt : 1;
        size_t per = gsize > SMALL ? (size_t)gsize : 0;
        buf = malloc((size_t)use * per * sizeof *buf + 1);
        if (!buf) goto oom;
#pragma omp parallel num_threads(use) if (use > 1)
        {
#ifdef _OPENMP
            uint32_t *mine = buf + (size_t)omp_get_thread_num() * per;
#else
            uint32_t *mine = buf;
#endif
#pragma omp for schedule(static) reduction(| : bad)
            for (int64_t g = 0; g < ng; g++) {
                group_t G = group_of(s, g, B, L, E);
                bad |= select_group(mask, &kth[g], scores, &G, gsize, K, mine);
            }
        }
    }
#ifdef _OPENMP
done:
#endif
    free(buf);
    if (bad) {
        if (kth != kth_out) free(kth);
        return nan_error("route", scores, total);
    }
    if (tau_b) {
        double sum = 0.0; /* serial, in group order: the same bits on every run */
        for (int64_t g = 0; g < ng; g++) sum += kth[g];
        *tau_b = (float)(sum / (double)ng);
    }
    if (kth != kth_out) free(kth);
    return RD_OK;
oom:
    free(buf);
    if (kth != kth_out) free(kth);
    return rd_fail(RD_ENOMEM, "route: out of memory for %lld score keys", (long long)gsize);
}

rd_status rd_route(uint8_t *mask, float *tau_b, const float *scores /* B,L,E */,
                   int64_t B, int64_t L, int64_t E, int64_t k, rd_strategy s) {
    return rd_route_kth(mask, NULL, tau_b, scores, B, L, E, k, s);
}

int64_t rd_route_num_thresholds(rd_strategy s, int64_t L, int64_t E) {
    switch (s) {
    case RD_ROUTE_BL: return E;
    case RD_ROUTE_BE: return L;
    case RD_ROUTE_RACE: return 1;
    default: return 0;
    }
}

/* The groups of BL, BE and race are those of rd_route: the threshold of pair (b, l, e)
 * is tau[e], tau[l] or tau[0]. */
rd_status rd_route_thresholds(uint8_t *mask, const float *scores /* B,L,E */,
                              const float *tau, int64_t B, int64_t L, int64_t E,
                              rd_strategy s) {
    int64_t nt = rd_route_num_thresholds(s, L, E);
    if (nt == 0)
        return rd_fail(RD_EINVAL, "route_thresholds: strategy '%s' has no thresholds (its "
                       "groups lie inside one image: exact top-K)", rd_strategy_name(s));
    for (int64_t g = 0; g < nt; g++)
        if (isnan(tau[g]))
            return rd_fail(RD_EINVAL, "route_thresholds: tau[%lld] is NaN", (long long)g);
    rd_status st = check_nan("route_thresholds", scores, B * L * E);
    if (st != RD_OK) return st;
#pragma omp parallel for schedule(static) if (B * L * E > 65536)
    for (int64_t t = 0; t < B * L; t++) {
        const float *g = scores + t * E;
        uint8_t *m = mask + t * E;
        if (s == RD_ROUTE_BL)
            for (int64_t e = 0; e < E; e++) m[e] = g[e] >= tau[e];
        else {
            float T = s == RD_ROUTE_BE ? tau[t % L] : tau[0];
            for (int64_t e = 0; e < E; e++) m[e] = g[e] >= T;
        }
    }
    return RD_OK;
}

rd_status rd_route_threshold(uint8_t *mask, const float *scores, int64_t n, float tau) {
    if (isnan(tau)) return rd_fail(RD_EINVAL, "route_threshold: tau must not be NaN");
    if (n < 0) return rd_fail(RD_EINVAL, "route_threshold: negative size n=%lld", (long long)n);
    rd_status st = check_nan("route_threshold", scores, n);
    if (st != RD_OK) return st;
#pragma omp parallel for if (n > 65536)
    for (int64_t i = 0; i < n; i++) mask[i] = scores[i] >= tau;
    return RD_OK;
}

rd_status rd_mask_row_counts(int64_t *counts, const uint8_t *mask, int64_t rows, int64_t cols) {
    if (rows < 0 || cols < 0)
        return rd_fail(RD_EINVAL, "mask_row_counts: negative size %lld x %lld", (long long)rows,
                       (long long)cols);
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *m = mask + r * cols;
        int64_t c = 0;
        for (int64_t j = 0; j < cols; j++) c += m[j] != 0;
        counts[r] = c;
    }
    return RD_OK;
}
