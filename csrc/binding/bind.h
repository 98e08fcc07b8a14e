/* bind.h — shared helpers of the CPython/NumPy binding (the only code that includes
 * Python.h). A binding function parses, validates with messages that name the
 * argument and give expected vs actual, allocates outputs with the GIL held, releases
 * the GIL around the C kernel only, and cleans up from one label. */
#ifndef RACEDIT_BIND_H
#define RACEDIT_BIND_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL racedit_ARRAY_API
#ifndef RD_BIND_MAIN
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <stdatomic.h>

#include "../racedit.h"

/* One thread at a time on a stateful object (a MoE layer, a model, the experts workspace).
 * rd_take claims the flag, or raises RuntimeError "<what>: in use by another thread";
 * rd_give hands it back. A binding function takes it right after parsing its arguments,
 * before anything that can release the GIL (converting an input, allocating an output,
 * a subclass's __array_finalize__, a __float__), and gives it back at its one cleanup
 * label: a check made earlier and a flag set later let a second thread in between. The
 * exchange is atomic, so the flag also holds where the GIL does not. */
typedef atomic_int rd_busy;
int rd_take(rd_busy *flag, const char *what);
/* rd_take without the exception: 1 when claimed, 0 when another thread holds it. */
int rd_try_take(rd_busy *flag);
void rd_give(rd_busy *flag);

/* The pointer held by capsule `cap` of name `name`, or NULL with TypeError
 * "<arg>: expected <what>, got <type>". */
void *rd_capsule_ptr(PyObject *cap, const char *name, const char *arg, const char *what);

/* The model of a racedit._C.model capsule, claimed for the caller (rd_give(*busy) after),
 * or NULL with the exception: for binding files acting on a whole model (bind_dist.c). */
struct rd_model *rd_bind_take_model(PyObject *cap, rd_busy **busy);

/* Wildcard for one dimension of an expected shape. */
#define RD_ANY (-1)

/* An input array: returns a new reference to a C-contiguous array of `typenum`
 * (float32 inputs of another float dtype or layout are converted; bool/int inputs
 * must already have the right dtype), or NULL with TypeError/ValueError naming
 * `name` and the expected vs actual ndim/shape/dtype. `shape` may hold RD_ANY. */
PyArrayObject *rd_in_array(PyObject *obj, const char *name, int typenum, int ndim,
                           const npy_intp *shape);
/* An array the kernel writes into (a parameter/gradient buffer): must already be
 * C-contiguous, writeable and of `typenum` — never converted, so writes are not lost.
 * Returns a borrowed pointer (cast) or NULL with an exception. */
PyArrayObject *rd_out_array(PyObject *obj, const char *name, int typenum, int ndim,
                            const npy_intp *shape);
/* A new zero-filled C-contiguous array. */
PyArrayObject *rd_new_array(int ndim, const npy_intp *shape, int typenum);
/* Raise the Python exception for a C-core status (message from rd_last_error()). */
PyObject *rd_raise(rd_status s);
/* A new (rows, cols) float64 array filled by fill(ctx, data) with the GIL released; the
 * array, or NULL with the exception for fill's status. */
PyObject *rd_f64_result(int64_t rows, int64_t cols, rd_status (*fill)(void *ctx, double *out),
                        void *ctx);
/* 0 when `out` (an array a kernel writes while reading the others) shares no memory with
 * any of the n arrays in[] (NULL entries skipped), else ValueError naming both. */
int rd_check_disjoint(PyArrayObject *out, const char *out_name, PyArrayObject *const *in, int n,
                      const char *const *names);
/* The UTF-8 text of the str `obj`, or NULL: with no exception when `obj` is not a str or
 * holds an embedded NUL (which a strcmp would cut short: "race\0x" must not read as
 * "race"), with the exception when it cannot be encoded. */
const char *rd_str_text(PyObject *obj);
/* Parse a strategy / gating given by name ("race", ...) or raise ValueError. */
int rd_parse_strategy(PyObject *obj, const char *argname, rd_strategy *out);
int rd_parse_gating(PyObject *obj, const char *argname, rd_gating *out);
/* An integer argument (Python int or NumPy integer; bool refused) or TypeError /
 * ValueError naming `name`. */
int rd_parse_int(PyObject *obj, const char *name, int64_t *out);
/* A real-number argument (int, float or NumPy number; bool refused) or TypeError. */
int rd_parse_real(PyObject *obj, const char *name, double *out);
/* The routing arguments shared by the CPU and CUDA bindings: scores (B, L, E) non-empty and
 * 0 <= k <= E, else ValueError naming them. */
int rd_check_route_args(int64_t B, int64_t L, int64_t E, int64_t k);
/* route_threshold's arguments: tau a real number, not NaN; scores a float ndarray of ndim
 * >= 1, returned as a new C-contiguous float32 reference in *scores. 0, or -1 with the
 * exception set. */
int rd_threshold_args(PyObject *o_scores, PyObject *o_tau, PyArrayObject **scores, double *tau);
/* Format a shape like "(2, 3, 4)" into buf. */
void rd_shape_str(char *buf, size_t n, int ndim, const npy_intp *shape);

/* Precision by name ("fp32", "tf32", "bf16"; NULL: fp32) into an rd_precision, or -1
 * with ValueError naming `name`. */
int rd_parse_precision(PyObject *obj, const char *name, int *out);

/* ---- devices ------------------------------------------------------------------------
 * The backend named by the keyword argument `device` ("cpu" when NULL): TypeError for a
 * non-str, ValueError for an unknown name, RuntimeError "CUDA not available: ..." for
 * "cuda" in a build without it. Whether a device is usable is checked later, by
 * rd_call_stage, so that bad arguments are reported first on any build. */
int rd_parse_device(PyObject *obj, const rd_backend **out);
/* RuntimeError "CUDA not available: ..." when be is CUDA's and no device is usable. */
int rd_device_ready(const rd_backend *be);

/* ---- one call's arrays -----------------------------------------------------------------
 * A binding function registers every array of its call with one rd_call as it validates
 * them: the inputs it converts (rd_call_in), the buffers the op writes in place
 * (rd_call_out, borrowed), the outputs it makes (rd_call_new). Each rd_call_* returns NULL
 * with the exception set, like the rd_* function it wraps. rd_call_stage puts them in the
 * backend's memory in the order registered: on a host-memory backend (the CPU) the NumPy
 * data itself; elsewhere copies allocated and uploaded (the GIL held), outputs starting as
 * their arrays' contents (new arrays as zeros set on the backend, not uploaded). A failed
 * upload is kept as the call's status: the op is skipped and the failure raised by
 * rd_call_finish, which downloads the outputs' copies into their arrays and frees every
 * copy. rd_call_end, at the function's one cleanup label, frees what the call holds: the
 * references, a context (`free_fn(free_arg)`) and the claim on a stateful object (`busy`). */
#define RD_CALL_MAX 24
typedef struct {
    PyArrayObject *a;
    void *dev;                      /* where the op sees it (rd_call_dev) */
    unsigned char own, out, copied; /* a reference held; downloaded; dev is a copy */
    unsigned char init;             /* how a copy starts (rd_call_init) */
} rd_call_item;
/* A copy starts as the array uploaded, as zeros set on the backend (a new array), or as
 * it is (scratch the op writes before it reads). */
enum rd_call_init { RD_INIT_UPLOAD = 0, RD_INIT_ZERO = 1, RD_INIT_NONE = 2 };
typedef struct {
    const rd_backend *be;
    rd_status status;
    int n;
    rd_call_item item[RD_CALL_MAX];
    void (*free_fn)(void *);
    void *free_arg;
    rd_busy *busy;
} rd_call;
PyArrayObject *rd_call_in(rd_call *c, PyObject *obj, const char *name, int typenum, int ndim,
                          const npy_intp *shape);
PyArrayObject *rd_call_out(rd_call *c, PyObject *obj, const char *name, int typenum, int ndim,
                           const npy_intp *shape);
PyArrayObject *rd_call_new(rd_call *c, int ndim, const npy_intp *shape, int typenum);
/* Scratch the op fully writes before it reads it, returned to nobody: an uninitialised
 * host array on a host-memory backend, elsewhere backend memory with nothing uploaded or
 * downloaded (the array only names it). */
PyArrayObject *rd_call_scratch(rd_call *c, int ndim, const npy_intp *shape, int typenum);
/* Register `a` (NULL passes through): `own` takes its reference, `out` downloads it. */
PyArrayObject *rd_call_add(rd_call *c, PyArrayObject *a, int own, int out);
int rd_call_stage(rd_call *c, const rd_backend *be);   /* rd_device_ready, then each array */
void *rd_call_dev(const rd_call *c, const PyArrayObject *a); /* NULL array: NULL */
int rd_call_finish(rd_call *c, rd_status st);          /* 0, or -1 with the exception */
void rd_call_end(rd_call *c);
/* `call` on the staged arrays with the GIL released, then rd_call_finish; goto done on a
 * failure (the exception set). RD_CALL_RUN stages first. */
#define RD_CALL_EXEC(c, call)                                    \
    do {                                                         \
        rd_status st_ = (c).status;                              \
        if (!st_) {                                              \
            Py_BEGIN_ALLOW_THREADS st_ = (call);                 \
            Py_END_ALLOW_THREADS                                 \
        }                                                        \
        if (rd_call_finish(&(c), st_) < 0) goto done;            \
    } while (0)
#define RD_CALL_RUN(c, be, call)                                  \
    do {                                                          \
        if (rd_call_stage(&(c), (be)) < 0) goto done;             \
        RD_CALL_EXEC(c, call);                                    \
    } while (0)
/* The same steps, `goto done` with the exception on a failure; the shape is listed. */
#define RD_IN(c, var, obj, name, type, nd, ...)                                    \
    do {                                                                           \
        npy_intp sh_[] = {__VA_ARGS__};                                            \
        if (!((var) = rd_call_in(&(c), (obj), (name), (type), (nd), sh_))) goto done; \
    } while (0)
#define RD_OUT(c, var, obj, name, type, nd, ...)                                    \
    do {                                                                            \
        npy_intp sh_[] = {__VA_ARGS__};                                             \
        if (!((var) = rd_call_out(&(c), (obj), (name), (type), (nd), sh_))) goto done; \
    } while (0)
#define RD_NEW(c, var, type, nd, ...)                                       \
    do {                                                                    \
        npy_intp sh_[] = {__VA_ARGS__};                                     \
        if (!((var) = rd_call_new(&(c), (nd), sh_, (type)))) goto done;     \
    } while (0)
#define RD_DEV(c, a) rd_call_dev(&(c), (a))
/* `call` with the GIL released on host memory; a failure raises and jumps to done. */
#define RD_RUN(call)                                \
    do {                                            \
        rd_status st_;                              \
        Py_BEGIN_ALLOW_THREADS st_ = (call);        \
        Py_END_ALLOW_THREADS                        \
        if (st_) { rd_raise(st_); goto done; }      \
    } while (0)
/* A status of the C core raised, then `goto done`. */
#define RD_CHECK(call)                              \
    do {                                            \
        rd_status st_ = (call);                     \
        if (st_) { rd_raise(st_); goto done; }      \
    } while (0)

/* ---- the MoE configuration and what a MoE layer's forward left ------------------------ */
/* Set the fields of `c` named in the dict `kw` (dim, num_experts, expert_hidden, k,
 * plr_dim, strategy, gating, beta, eval_topk, sim_weight, balance_weight, plr_weight), then,
 * with `check`, check the whole (rd_moe_cfg_check; a dense model's unused settings are
 * not); `c` is unchanged on failure. The one parser of a MoE configuration: the layer's
 * and the model's. */
int rd_parse_moe_settings(PyObject *kw, rd_moe_cfg *c, int check);
/* A copy of the keyword dict `kw` (may be NULL) without its "device" and "precision"
 * entries, which go to *device and *precision (borrowed from kw; NULL when absent). */
PyObject *rd_split_settings(PyObject *kw, PyObject **device, PyObject **precision);
/* The settings of `c` as a dict with the keys rd_parse_moe_settings reads. */
PyObject *rd_moe_settings_dict(const rd_moe_cfg *c);
/* Thresholds given from Python (`name` in messages): None -> *out = NULL; a number or a
 * 1-D sequence of numbers without NaN -> a new float32 1-D array (a number: one value). */
int rd_parse_thresholds(PyObject *o, const char *name, PyArrayObject **out);
/* The thresholds of a view (host memory): None when unset, else a float32 (ntau,) copy. */
PyObject *rd_thresholds_of(const rd_moe_view *v);
/* What the last forward of backend MoE state `st` left, by name: "threshold" (the mean of
 * the thresholds, None when unset or the strategy has none), "thresholds" (all of them,
 * float32 (ntau,), None when unset), "batch_threshold", "mask" (B,L,E) bool, "gates",
 * "logits" (B,L,E), "hidden" (B,L,D), "counts" (E,) int64, "pairs" (None before a forward),
 * "sample_pairs" (B,) int64, the pairs selected for each sample (counted where the mask
 * lives: B numbers cross, not the mask), or "aux": the aux losses and
 * diagnostics as a dict (None before a forward): sim_loss, balance_loss, plr_loss (None
 * when not computed), aux_loss, max_violation, combination_usage, dead_experts,
 * experts_per_token, expert_load (E,), threshold, batch_threshold (None before the first
 * training forward), plr_pred (B,L,plr_dim) or None, training; "aux_stats": that dict
 * without plr_pred, so nothing is downloaded (scalars only off the CPU). Copies. One set
 * of names and one dict shape for a MoE layer and a model's MoE blocks on every device;
 * ValueError for another name. */
PyObject *rd_moe_get(const rd_backend *be, void *st, const char *name);
/* A copy of what the view's backend pointer `src` holds, as a new array. */
PyObject *rd_download_array(const rd_backend *be, const void *src, int ndim,
                            const npy_intp *shape, int typenum);

/* The Fortran sgemm of scipy.linalg.cython_blas.__pyx_capi__ (SciPy's supported Cython
 * BLAS API: whatever BLAS SciPy ships), or NULL (an exception may be set). */
void *rd_scipy_sgemm(void);

/* Each area registers its functions on the module. */
int rd_bind_route(PyObject *m);
int rd_bind_moe(PyObject *m);
int rd_bind_losses(PyObject *m);
int rd_bind_dit(PyObject *m);
int rd_bind_model(PyObject *m);
int rd_bind_train(PyObject *m);
int rd_bind_dist(PyObject *m);

#endif
