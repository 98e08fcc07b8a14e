/* bind_cuda.c — Python functions of the CUDA backend (racedit._C.cuda_*): every CUDA op
 * on NumPy arrays, copied to the device and back at the boundary, plus a persistent
 * device MoE layer state (a capsule) and a device-resident benchmark. Validation is the
 * CPU binding's (rd_in_array / rd_out_array, messages naming the argument); the GIL is
 * released around the device work only. Without RD_HAVE_CUDA nothing is registered and
 * racedit.cuda raises RuntimeError. */
#include "bind.h"

#ifdef RD_HAVE_CUDA

#include <math.h>
#include <string.h>

/* Device buffers of one call, freed together from the cleanup label. */
typedef struct {
    void *d[32];
    int n;
} dlist;

static rd_status dl_alloc(dlist *L, void **out, size_t bytes) {
    *out = NULL;
    if (L->n >= 32) return rd_fail(RD_ENOMEM, "cuda binding: too many device buffers");
    rd_status s = rd_cuda_malloc(out, bytes ? bytes : 4);
    if (s == RD_OK) L->d[L->n++] = *out;
    return s;
}

static rd_status dl_up(dlist *L, void **out, PyArrayObject *a) {
    size_t b = (size_t)PyArray_NBYTES(a);
    rd_status s = dl_alloc(L, out, b);
    return s == RD_OK ? rd_cuda_h2d(*out, PyArray_DATA(a), b) : s;
}

static rd_status dl_down(PyArrayObject *a, const void *d) {
    return rd_cuda_d2h(PyArray_DATA(a), d, (size_t)PyArray_NBYTES(a));
}

static void dl_free(dlist *L) {
    for (int i = 0; i < L->n; i++) rd_cuda_free(L->d[i]);
    L->n = 0;
}

static int need_device(void) {
    if (rd_cuda_device_count() > 0) return 0;
    PyErr_SetString(PyExc_RuntimeError,
                    "CUDA not available: racedit was built with CUDA but no CUDA device is usable");
    return -1;
}

/* ---- routing ---------------------------------------------------------------------- */
static PyObject *py_route(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_scores, *o_k, *o_strategy, *ret = NULL;
    PyArrayObject *scores = NULL, *mask = NULL;
    int64_t k, ng, K;
    rd_strategy s;
    dlist L = {{0}, 0};
    if (!PyArg_ParseTuple(args, "OOO:cuda_route", &o_scores, &o_k, &o_strategy)) return NULL;
    if (rd_parse_int(o_k, "k", &k) < 0 || rd_parse_strategy(o_strategy, "strategy", &s) < 0) return NULL;
    if (!(scores = rd_in_array(o_scores, "scores", NPY_FLOAT32, 3, NULL))) return NULL;
    npy_intp *dims = PyArray_DIMS(scores);
    int64_t B = dims[0], Ls = dims[1], E = dims[2];
    if (rd_check_route_args(B, Ls, E, k) < 0) goto done;
    rd_status st = rd_route_plan(&ng, &K, B, Ls, E, k, s);
    if (st != RD_OK) { rd_raise(st); goto done; }
    if (need_device() < 0) goto done;
    if (!(mask = rd_new_array(3, dims, NPY_BOOL))) goto done;
    float tau = 0.0f;
    Py_BEGIN_ALLOW_THREADS
    void *d_s, *d_m, *d_t;
    st = dl_up(&L, &d_s, scores);
    if (st == RD_OK) st = dl_alloc(&L, &d_m, (size_t)(B * Ls * E));
    if (st == RD_OK) st = dl_alloc(&L, &d_t, sizeof(float));
    if (st == RD_OK) st = rd_route_cuda(d_m, d_t, d_s, B, Ls, E, k, s);
    if (st == RD_OK) st = dl_down(mask, d_m);
    if (st == RD_OK) st = rd_cuda_d2h(&tau, d_t, sizeof tau);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto done; }
    ret = Py_BuildValue("Od", (PyObject *)mask, (double)tau);
done:
    Py_XDECREF(scores);
    Py_XDECREF(mask);
    return ret;
}

static PyObject *py_route_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_scores, *o_tau;
    PyArrayObject *scores = NULL, *mask = NULL;
    double tau;
    dlist L = {{0}, 0};
    if (!PyArg_ParseTuple(args, "OO:cuda_route_threshold", &o_scores, &o_tau)) return NULL;
    if (rd_threshold_args(o_scores, o_tau, &scores, &tau) < 0) return NULL;
    if (need_device() < 0) goto done;
    if (!(mask = rd_new_array(PyArray_NDIM(scores), PyArray_DIMS(scores), NPY_BOOL))) goto done;
    int64_t n = (int64_t)PyArray_SIZE(scores);
    rd_status st = RD_OK;
    Py_BEGIN_ALLOW_THREADS
    void *d_s, *d_m;
    st = dl_up(&L, &d_s, scores);
    if (st == RD_OK) st = dl_alloc(&L, &d_m, (size_t)n);
    if (st == RD_OK) st = rd_route_threshold_cuda(d_m, d_s, n, (float)tau);
    if (st == RD_OK) st = dl_down(mask, d_m);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); Py_CLEAR(mask); }
done:
    Py_XDECREF(scores);
    return (PyObject *)mask;
}

/* ---- gating ----------------------------------------------------------------------- */
static PyObject *gate_common(PyObject *args, int backward) {
    PyObject *o_a, *o_b = NULL, *o_g;
    PyArrayObject *a = NULL, *b = NULL, *out = NULL;
    rd_gating g;
    dlist L = {{0}, 0};
    if (backward) {
        if (!PyArg_ParseTuple(args, "OOO:cuda_gate_backward", &o_a, &o_b, &o_g)) return NULL;
    } else if (!PyArg_ParseTuple(args, "OO:cuda_gate_forward", &o_a, &o_g)) {
        return NULL;
    }
    if (rd_parse_gating(o_g, "gating", &g) < 0) return NULL;
    if (!(a = rd_in_array(o_a, backward ? "dG" : "R", NPY_FLOAT32, 2, NULL))) return NULL;
    if (backward && !(b = rd_in_array(o_b, "G", NPY_FLOAT32, 2, PyArray_DIMS(a)))) goto done;
    int64_t N = PyArray_DIM(a, 0), E = PyArray_DIM(a, 1);
    if (E < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected E >= 1 columns, got shape (%lld, %lld)",
                     backward ? "dG" : "R", (long long)N, (long long)E);
        goto done;
    }
    if (need_device() < 0) goto done;
    if (!(out = rd_new_array(2, PyArray_DIMS(a), NPY_FLOAT32))) goto done;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    void *da, *db = NULL, *dout;
    st = dl_up(&L, &da, a);
    if (st == RD_OK && backward) st = dl_up(&L, &db, b);
    if (st == RD_OK) st = dl_alloc(&L, &dout, (size_t)PyArray_NBYTES(a));
    if (st == RD_OK)
        st = backward ? rd_gate_backward_cuda(dout, da, db, N, E, g) : rd_gate_forward_cuda(dout, da, N, E, g);
    if (st == RD_OK) st = dl_down(out, dout);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); Py_CLEAR(out); }
done:
    Py_XDECREF(a);
    Py_XDECREF(b);
    return (PyObject *)out;
}

static PyObject *py_gate_forward(PyObject *self, PyObject *args) { (void)self; return gate_common(args, 0); }
static PyObject *py_gate_backward(PyObject *self, PyObject *args) { (void)self; return gate_common(args, 1); }

/* ---- router ----------------------------------------------------------------------- */
static PyObject *py_router_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[5], *ret = NULL;
    PyArrayObject *a[5] = {0}, *hpre = NULL, *h = NULL, *R = NULL;
    dlist L = {{0}, 0};
    if (!PyArg_ParseTuple(args, "OOOOO:cuda_router_forward", &o[0], &o[1], &o[2], &o[3], &o[4])) return NULL;
    if (!(a[0] = rd_in_array(o[0], "x", NPY_FLOAT32, 2, NULL))) return NULL;
    int64_t N = PyArray_DIM(a[0], 0), D = PyArray_DIM(a[0], 1);
    npy_intp sWr[2] = {D, D}, sbr[1] = {D}, sWg[2] = {D, RD_ANY};
    if (!(a[1] = rd_in_array(o[1], "Wr", NPY_FLOAT32, 2, sWr))) goto done;
    if (!(a[2] = rd_in_array(o[2], "br", NPY_FLOAT32, 1, sbr))) goto done;
    if (!(a[3] = rd_in_array(o[3], "Wg", NPY_FLOAT32, 2, sWg))) goto done;
    int64_t E = PyArray_DIM(a[3], 1);
    npy_intp sbg[1] = {E};
    if (!(a[4] = rd_in_array(o[4], "bg", NPY_FLOAT32, 1, sbg))) goto done;
    if (D < 1 || E < 1) {
        PyErr_Format(PyExc_ValueError, "x, Wg: expected D >= 1 and E >= 1, got D=%lld E=%lld",
                     (long long)D, (long long)E);
        goto done;
    }
    if (need_device() < 0) goto done;
    npy_intp sND[2] = {N, D}, sNE[2] = {N, E};
    if (!(hpre = rd_new_array(2, sND, NPY_FLOAT32)) || !(h = rd_new_array(2, sND, NPY_FLOAT32)) ||
        !(R = rd_new_array(2, sNE, NPY_FLOAT32)))
        goto done;
    rd_status st = RD_OK;
    Py_BEGIN_ALLOW_THREADS
    void *d[5], *dhp, *dh, *dR;
    for (int i = 0; i < 5 && st == RD_OK; i++) st = dl_up(&L, &d[i], a[i]);
    if (st == RD_OK) st = dl_alloc(&L, &dhp, (size_t)PyArray_NBYTES(hpre));
    if (st == RD_OK) st = dl_alloc(&L, &dh, (size_t)PyArray_NBYTES(h));
    if (st == RD_OK) st = dl_alloc(&L, &dR, (size_t)PyArray_NBYTES(R));
    if (st == RD_OK) st = rd_router_forward_cuda(dhp, dh, dR, d[0], d[1], d[2], d[3], d[4], N, D, E);
    if (st == RD_OK) st = dl_down(hpre, dhp);
    if (st == RD_OK) st = dl_down(h, dh);
    if (st == RD_OK) st = dl_down(R, dR);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto done; }
    ret = PyTuple_Pack(3, (PyObject *)hpre, (PyObject *)h, (PyObject *)R);
done:
    for (int i = 0; i < 5; i++) Py_XDECREF(a[i]);
    Py_XDECREF(hpre); Py_XDECREF(h); Py_XDECREF(R);
    return ret;
}

static PyObject *py_router_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[7], *ret = NULL;
    PyArrayObject *a[7] = {0}, *out[5] = {0};
    dlist L = {{0}, 0};
    if (!PyArg_ParseTuple(args, "OOOOOOO:cuda_router_backward", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6]))
        return NULL;
    /* dR (N,E), hpre (N,D), h (N,D), x (N,D), Wr (D,D), Wg (D,E), dh_extra (N,D) or None */
    if (!(a[0] = rd_in_array(o[0], "dR", NPY_FLOAT32, 2, NULL))) return NULL;
    if (!(a[1] = rd_in_array(o[1], "hpre", NPY_FLOAT32, 2, NULL))) goto done;
    int64_t N = PyArray_DIM(a[0], 0), E = PyArray_DIM(a[0], 1), D = PyArray_DIM(a[1], 1);
    npy_intp sND[2] = {N, D}, sDD[2] = {D, D}, sDE[2] = {D, E}, sD[1] = {D}, sE[1] = {E};
    if (PyArray_DIM(a[1], 0) != N) {
        PyErr_Format(PyExc_ValueError, "hpre: expected %lld rows (as dR), got %lld", (long long)N,
                     (long long)PyArray_DIM(a[1], 0));
        goto done;
    }
    if (!(a[2] = rd_in_array(o[2], "h", NPY_FLOAT32, 2, sND))) goto done;
    if (!(a[3] = rd_in_array(o[3], "x", NPY_FLOAT32, 2, sND))) goto done;
    if (!(a[4] = rd_in_array(o[4], "Wr", NPY_FLOAT32, 2, sDD))) goto done;
    if (!(a[5] = rd_in_array(o[5], "Wg", NPY_FLOAT32, 2, sDE))) goto done;
    if (o[6] != Py_None && !(a[6] = rd_in_array(o[6], "dh_extra", NPY_FLOAT32, 2, sND))) goto done;
    if (D < 1 || E < 1) {
        PyErr_Format(PyExc_ValueError, "dR, hpre: expected D >= 1 and E >= 1, got D=%lld E=%lld",
                     (long long)D, (long long)E);
        goto done;
    }
    if (need_device() < 0) goto done;
    if (!(out[0] = rd_new_array(2, sND, NPY_FLOAT32)) || !(out[1] = rd_new_array(2, sDD, NPY_FLOAT32)) ||
        !(out[2] = rd_new_array(1, sD, NPY_FLOAT32)) || !(out[3] = rd_new_array(2, sDE, NPY_FLOAT32)) ||
        !(out[4] = rd_new_array(1, sE, NPY_FLOAT32)))
        goto done;
    rd_status st = RD_OK;
    Py_BEGIN_ALLOW_THREADS
    void *d[7] = {0}, *g[5] = {0}, *dh = NULL;
    for (int i = 0; i < 7 && st == RD_OK; i++)
        if (a[i]) st = dl_up(&L, &d[i], a[i]);
    /* outputs start at zero: the parameter grads accumulate, dx_acc too */
    for (int i = 0; i < 5 && st == RD_OK; i++) st = dl_up(&L, &g[i], out[i]);
    if (st == RD_OK) st = dl_alloc(&L, &dh, (size_t)PyArray_NBYTES(a[3]));
    if (st == RD_OK)
        st = rd_router_backward_cuda(g[0], g[1], g[2], g[3], g[4], dh, d[0], d[6], d[1], d[2], d[3],
                                     d[4], d[5], N, D, E);
    for (int i = 0; i < 5 && st == RD_OK; i++) st = dl_down(out[i], g[i]);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto done; }
    ret = PyTuple_Pack(5, out[0], out[1], out[2], out[3], out[4]);
done:
    for (int i = 0; i < 7; i++) Py_XDECREF(a[i]);
    for (int i = 0; i < 5; i++) Py_XDECREF(out[i]);
    return ret;
}

/* ---- experts ---------------------------------------------------------------------- */
/* prec: 0 fp32, 1 tf32, 2 bf16 (racedit.cuda maps the names). */
static int check_precision(int prec) {
    if (prec < RD_PREC_FP32 || prec > RD_PREC_BF16) {
        PyErr_Format(PyExc_ValueError, "precision: expected 0 (fp32), 1 (tf32) or 2 (bf16), got %d", prec);
        return -1;
    }
    return 0;
}

/* x (N,D), mask (N,E) bool, G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D). */
static int experts_inputs(PyObject **o, PyArrayObject **a, int64_t *N, int64_t *D, int64_t *E,
                          int64_t *He) {
    if (!(a[0] = rd_in_array(o[0], "x", NPY_FLOAT32, 2, NULL))) return -1;
    *N = PyArray_DIM(a[0], 0);
    *D = PyArray_DIM(a[0], 1);
    npy_intp sm[2] = {*N, RD_ANY};
    if (!(a[1] = rd_in_array(o[1], "mask", NPY_BOOL, 2, sm))) return -1;
    *E = PyArray_DIM(a[1], 1);
    npy_intp sNE[2] = {*N, *E}, sw1[3] = {*E, *D, RD_ANY};
    if (!(a[2] = rd_in_array(o[2], "G", NPY_FLOAT32, 2, sNE))) return -1;
    if (!(a[3] = rd_in_array(o[3], "w1", NPY_FLOAT32, 3, sw1))) return -1;
    *He = PyArray_DIM(a[3], 2);
    npy_intp sb1[2] = {*E, *He}, sw2[3] = {*E, *He, *D}, sb2[2] = {*E, *D};
    if (!(a[4] = rd_in_array(o[4], "b1", NPY_FLOAT32, 2, sb1))) return -1;
    if (!(a[5] = rd_in_array(o[5], "w2", NPY_FLOAT32, 3, sw2))) return -1;
    if (!(a[6] = rd_in_array(o[6], "b2", NPY_FLOAT32, 2, sb2))) return -1;
    if (*D < 1 || *E < 1 || *He < 1) {
        PyErr_Format(PyExc_ValueError, "x, mask, w1: expected D, E, He >= 1, got D=%lld E=%lld He=%lld",
                     (long long)*D, (long long)*E, (long long)*He);
        return -1;
    }
    return 0;
}

static PyObject *py_experts_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[7];
    PyArrayObject *a[7] = {0}, *y = NULL;
    dlist L = {{0}, 0};
    int64_t N, D, E, He;
    int prec = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOO|i:cuda_experts_forward", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &prec))
        return NULL;
    if (check_precision(prec) < 0) return NULL;
    if (experts_inputs(o, a, &N, &D, &E, &He) < 0 || need_device() < 0) goto done;
    if (!(y = rd_new_array(2, PyArray_DIMS(a[0]), NPY_FLOAT32))) goto done;
    rd_experts_cuda *ex = rd_experts_cuda_new();
    if (!ex) { PyErr_NoMemory(); Py_CLEAR(y); goto done; }
    rd_status st = rd_experts_cuda_set_precision(ex, prec);
    Py_BEGIN_ALLOW_THREADS
    void *d[7], *dy;
    for (int i = 0; i < 7 && st == RD_OK; i++) st = dl_up(&L, &d[i], a[i]);
    if (st == RD_OK) st = dl_alloc(&L, &dy, (size_t)PyArray_NBYTES(y));
    if (st == RD_OK) st = rd_experts_forward_cuda(ex, dy, d[1], d[2], d[0], d[3], d[4], d[5], d[6], N, D, E, He);
    if (st == RD_OK) st = dl_down(y, dy);
    rd_experts_cuda_free(ex);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); Py_CLEAR(y); }
done:
    for (int i = 0; i < 7; i++) Py_XDECREF(a[i]);
    return (PyObject *)y;
}

static PyObject *py_experts_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[8], *ret = NULL;
    PyArrayObject *a[7] = {0}, *dyin = NULL, *out[6] = {0};
    dlist L = {{0}, 0};
    int64_t N, D, E, He;
    int prec = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOOO|i:cuda_experts_backward", &o[7], &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6], &prec))
        return NULL;
    if (check_precision(prec) < 0) return NULL;
    if (experts_inputs(o, a, &N, &D, &E, &He) < 0) goto done;
    if (!(dyin = rd_in_array(o[7], "dy", NPY_FLOAT32, 2, PyArray_DIMS(a[0])))) goto done;
    if (need_device() < 0) goto done;
    /* dx like x, dG like G, then the parameter grads like the parameters (zeros) */
    for (int i = 0; i < 6; i++) {
        PyArrayObject *like = i == 0 ? a[0] : a[i + 1];
        if (!(out[i] = rd_new_array(PyArray_NDIM(like), PyArray_DIMS(like), NPY_FLOAT32))) goto done;
    }
    rd_experts_cuda *ex = rd_experts_cuda_new();
    if (!ex) { PyErr_NoMemory(); goto done; }
    rd_status st = rd_experts_cuda_set_precision(ex, prec);
    Py_BEGIN_ALLOW_THREADS
    void *d[7], *ddy, *dy_scratch, *g[6];
    for (int i = 0; i < 7 && st == RD_OK; i++) st = dl_up(&L, &d[i], a[i]);
    if (st == RD_OK) st = dl_up(&L, &ddy, dyin);
    for (int i = 0; i < 6 && st == RD_OK; i++) st = dl_up(&L, &g[i], out[i]);
    if (st == RD_OK) st = dl_alloc(&L, &dy_scratch, (size_t)PyArray_NBYTES(a[0]));
    if (st == RD_OK)
        st = rd_experts_forward_cuda(ex, dy_scratch, d[1], d[2], d[0], d[3], d[4], d[5], d[6], N, D, E, He);
    if (st == RD_OK)
        st = rd_experts_backward_cuda(ex, g[0], g[1], g[2], g[3], g[4], g[5], ddy, d[3], d[5], N, D, E, He);
    for (int i = 0; i < 6 && st == RD_OK; i++) st = dl_down(out[i], g[i]);
    rd_experts_cuda_free(ex);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto done; }
    ret = PyTuple_Pack(6, out[0], out[1], out[2], out[3], out[4], out[5]);
done:
    for (int i = 0; i < 7; i++) Py_XDECREF(a[i]);
    for (int i = 0; i < 6; i++) Py_XDECREF(out[i]);
    Py_XDECREF(dyin);
    return ret;
}

/* ---- the layer -------------------------------------------------------------------- */
#define STATE_CAPSULE "racedit.cuda_moe_state"

/* A layer-state capsule's payload: the state, the flag that lets one call at a time work
 * on it (its own for a cuda_moe_state(); the model's for a model's MoE block, which the
 * model's forward works on as well) and the input of its last forward, which
 * cuda_moe_backward differentiates at when given x=None. */
typedef struct {
    rd_moe_cuda_state *st;
    rd_busy own, *busy;
    PyObject *x;
} cstate_box;

static void state_destructor(PyObject *cap) {
    cstate_box *b = (cstate_box *)PyCapsule_GetPointer(cap, STATE_CAPSULE);
    if (!b) return;
    rd_moe_cuda_state_free(b->st);
    Py_XDECREF(b->x);
    PyMem_Free(b);
}

/* The box of a state capsule claimed for this call (give it back with rd_give(b->busy)),
 * or NULL with the exception. */
static cstate_box *take_state(PyObject *cap) {
    cstate_box *b = (cstate_box *)rd_capsule_ptr(cap, STATE_CAPSULE, "state", "a CUDA MoE state capsule");
    if (b && rd_take(b->busy, "state") < 0) return NULL;
    return b;
}

static PyObject *py_moe_state(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    if (need_device() < 0) return NULL;
    cstate_box *b = (cstate_box *)PyMem_Calloc(1, sizeof *b);
    if (!b) return PyErr_NoMemory();
    b->busy = &b->own;
    if (!(b->st = rd_moe_cuda_state_new())) {
        PyMem_Free(b);
        return PyErr_NoMemory();
    }
    PyObject *cap = PyCapsule_New(b, STATE_CAPSULE, state_destructor);
    if (!cap) {
        rd_moe_cuda_state_free(b->st);
        PyMem_Free(b);
    }
    return cap;
}

/* cfg: a dict with D, E, He, k (int), strategy, gating (str), beta (float), eval_topk (bool),
 * and optionally plr_dim (int, default 0), sim_weight, balance_weight (default 0) and
 * plr_weight (default 1). */
static int parse_cfg(PyObject *d, rd_moe_cfg *c) {
    if (!PyDict_Check(d)) {
        PyErr_Format(PyExc_TypeError, "cfg: expected a dict, got %s", Py_TYPE(d)->tp_name);
        return -1;
    }
    memset(c, 0, sizeof *c);
    const char *ints[4] = {"D", "E", "He", "k"};
    int64_t *dst[4] = {&c->D, &c->E, &c->He, &c->k};
    for (int i = 0; i < 4; i++) {
        PyObject *v = PyDict_GetItemString(d, ints[i]);
        if (!v) { PyErr_Format(PyExc_ValueError, "cfg: missing key '%s'", ints[i]); return -1; }
        if (rd_parse_int(v, ints[i], dst[i]) < 0) return -1;
    }
    PyObject *s = PyDict_GetItemString(d, "strategy"), *g = PyDict_GetItemString(d, "gating");
    PyObject *b = PyDict_GetItemString(d, "beta"), *et = PyDict_GetItemString(d, "eval_topk");
    if (!s || !g || !b || !et) {
        PyErr_SetString(PyExc_ValueError, "cfg: expected keys strategy, gating, beta, eval_topk");
        return -1;
    }
    if (rd_parse_strategy(s, "strategy", &c->strategy) < 0 || rd_parse_gating(g, "gating", &c->gating) < 0)
        return -1;
    double beta;
    if (rd_parse_real(b, "beta", &beta) < 0) return -1;
    c->beta = (float)beta;
    int t = PyObject_IsTrue(et);
    if (t < 0) return -1;
    c->eval_topk = t;
    PyObject *pd = PyDict_GetItemString(d, "plr_dim");
    if (pd && rd_parse_int(pd, "plr_dim", &c->plr_dim) < 0) return -1;
    const char *fl[3] = {"sim_weight", "balance_weight", "plr_weight"};
    float *fdst[3] = {&c->sim_weight, &c->balance_weight, &c->plr_weight};
    c->plr_weight = 1.0f;
    for (int i = 0; i < 3; i++) {
        PyObject *v = PyDict_GetItemString(d, fl[i]);
        double w;
        if (!v) continue;
        if (rd_parse_real(v, fl[i], &w) < 0) return -1;
        if (!(w >= 0.0) || isinf(w)) {
            PyErr_Format(PyExc_ValueError, "%s: expected a finite number >= 0, got %R", fl[i], v);
            return -1;
        }
        *fdst[i] = (float)w;
    }
    if (c->plr_dim < 0) {
        PyErr_Format(PyExc_ValueError, "plr_dim: expected >= 0, got %lld", (long long)c->plr_dim);
        return -1;
    }
    rd_status st = rd_moe_cfg_check(c);
    if (st != RD_OK) { rd_raise(st); return -1; }
    return 0;
}

static PyObject *py_moe_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_st, *o_x, *o_p, *o_cfg, *o_t = Py_None;
    int training;
    PyArrayObject *x = NULL, *params = NULL, *y = NULL, *target = NULL;
    dlist L = {{0}, 0};
    rd_moe_cfg cfg;
    if (!PyArg_ParseTuple(args, "OOOOp|O:cuda_moe_forward", &o_st, &o_x, &o_p, &o_cfg, &training, &o_t))
        return NULL;
    cstate_box *sb = take_state(o_st);
    if (!sb) return NULL;
    rd_moe_cuda_state *st = sb->st;
    if (parse_cfg(o_cfg, &cfg) < 0) goto done;
    int64_t sizes[RD_MOE_NPARAM];
    npy_intp np[1] = {(npy_intp)rd_moe_param_sizes(sizes, &cfg)};
    npy_intp sx[3] = {RD_ANY, RD_ANY, cfg.D};
    if (!(x = rd_in_array(o_x, "x", NPY_FLOAT32, 3, sx))) goto done;
    if (!(params = rd_in_array(o_p, "params", NPY_FLOAT32, 1, np))) goto done;
    int64_t B = PyArray_DIM(x, 0), Ls = PyArray_DIM(x, 1);
    if (B < 1 || Ls < 1) {
        PyErr_Format(PyExc_ValueError, "x: expected B, L >= 1, got shape (%lld, %lld, %lld)",
                     (long long)B, (long long)Ls, (long long)cfg.D);
        goto done;
    }
    if (o_t != Py_None) {
        if (cfg.plr_dim == 0) {
            PyErr_SetString(PyExc_ValueError, "plr_target: given, but the layer has no PLR head (plr_dim=0)");
            goto done;
        }
        npy_intp st3[3] = {B, Ls, cfg.plr_dim};
        if (!(target = rd_in_array(o_t, "plr_target", NPY_FLOAT32, 3, st3))) goto done;
    }
    if (!(y = rd_new_array(3, PyArray_DIMS(x), NPY_FLOAT32))) goto done;
    rd_status s = RD_OK;
    Py_CLEAR(sb->x);
    Py_BEGIN_ALLOW_THREADS
    void *dx, *dp, *dy, *dt = NULL;
    rd_moe_params p;
    s = dl_up(&L, &dx, x);
    if (s == RD_OK) s = dl_up(&L, &dp, params);
    if (s == RD_OK && target) s = dl_up(&L, &dt, target);
    if (s == RD_OK) s = dl_alloc(&L, &dy, (size_t)PyArray_NBYTES(y));
    if (s == RD_OK) {
        rd_moe_params_point(&p, dp, &cfg);
        s = rd_moe_forward_cuda(st, dy, dx, &cfg, &p, B, Ls, training, (const float *)dt);
    }
    if (s == RD_OK) s = dl_down(y, dy);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); Py_CLEAR(y); }
    else sb->x = Py_NewRef((PyObject *)x);
done:
    rd_give(sb->busy);
    Py_XDECREF(x);
    Py_XDECREF(params);
    Py_XDECREF(target);
    return (PyObject *)y;
}

static PyObject *py_moe_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_st, *o_dy, *o_x, *o_p, *o_g, *o_cfg;
    PyArrayObject *dyin = NULL, *x = NULL, *params = NULL, *grads, *dx = NULL;
    dlist L = {{0}, 0};
    rd_moe_cfg cfg;
    if (!PyArg_ParseTuple(args, "OOOOOO:cuda_moe_backward", &o_st, &o_dy, &o_x, &o_p, &o_g, &o_cfg))
        return NULL;
    cstate_box *sb = take_state(o_st);
    if (!sb) return NULL;
    rd_moe_cuda_state *st = sb->st;
    if (parse_cfg(o_cfg, &cfg) < 0) goto done;
    if (o_x == Py_None && !sb->x) {
        PyErr_SetString(PyExc_RuntimeError, "moe_backward: no forward to differentiate (call forward first)");
        goto done;
    }
    int64_t sizes[RD_MOE_NPARAM];
    npy_intp np[1] = {(npy_intp)rd_moe_param_sizes(sizes, &cfg)};
    npy_intp sx[3] = {RD_ANY, RD_ANY, cfg.D};
    if (!(x = rd_in_array(o_x == Py_None ? sb->x : o_x, "x", NPY_FLOAT32, 3, sx))) goto done;
    if (!(dyin = rd_in_array(o_dy, "dy", NPY_FLOAT32, 3, PyArray_DIMS(x)))) goto done;
    if (!(params = rd_in_array(o_p, "params", NPY_FLOAT32, 1, np))) goto done;
    if (!(grads = rd_out_array(o_g, "grads", NPY_FLOAT32, 1, np))) goto done;
    if (!(dx = rd_new_array(3, PyArray_DIMS(x), NPY_FLOAT32))) goto done;
    rd_status s = RD_OK;
    Py_BEGIN_ALLOW_THREADS
    void *ddy, *dxin, *dp, *dg, *ddx;
    rd_moe_params p, g;
    s = dl_up(&L, &ddy, dyin);
    if (s == RD_OK) s = dl_up(&L, &dxin, x);
    if (s == RD_OK) s = dl_up(&L, &dp, params);
    if (s == RD_OK) s = dl_up(&L, &dg, grads); /* grads accumulate into what is there */
    if (s == RD_OK) s = dl_alloc(&L, &ddx, (size_t)PyArray_NBYTES(dx));
    if (s == RD_OK) {
        rd_moe_params_point(&p, dp, &cfg);
        rd_moe_params_point(&g, dg, &cfg);
        s = rd_moe_backward_cuda(st, ddx, &g, ddy, dxin, &cfg, &p);
    }
    if (s == RD_OK) s = dl_down(dx, ddx);
    if (s == RD_OK) s = dl_down(grads, dg);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); Py_CLEAR(dx); }
done:
    rd_give(sb->busy);
    Py_XDECREF(x);
    Py_XDECREF(dyin);
    Py_XDECREF(params);
    return (PyObject *)dx;
}

/* cuda_moe_view(state[, arrays=2]) -> dict: tau, tau_b (None when unset), have_forward and,
 * after a forward, counts (E,) int64 and P; with arrays >= 1 also mask (N,E) bool, with
 * arrays >= 2 also G, R (N,E) and h (N,D) float32 (device copies: h alone is N*D floats,
 * so per-step diagnostics ask for less). */
static PyObject *moe_view(rd_moe_cuda_state *st, PyObject *args) {
    PyObject *o_st, *d = NULL;
    PyArrayObject *arr[5] = {0};
    int what = 2;
    if (!PyArg_ParseTuple(args, "O|i:cuda_moe_view", &o_st, &what)) return NULL;
    if (what < 0 || what > 2) {
        PyErr_Format(PyExc_ValueError, "arrays: expected 0 (none), 1 (mask) or 2 (all), got %d", what);
        return NULL;
    }
    rd_moe_cuda_view v;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_moe_cuda_state_view(st, &v);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) return rd_raise(s);
    if (!(d = PyDict_New())) return NULL;
    PyObject *t;
    t = v.have_tau ? PyFloat_FromDouble(v.tau) : Py_NewRef(Py_None);
    PyDict_SetItemString(d, "tau", t); Py_XDECREF(t);
    t = v.have_forward && !isnan(v.tau_b) ? PyFloat_FromDouble(v.tau_b) : Py_NewRef(Py_None);
    PyDict_SetItemString(d, "tau_b", t); Py_XDECREF(t);
    PyDict_SetItemString(d, "have_forward", v.have_forward ? Py_True : Py_False);
    if (!v.have_forward) return d;
    npy_intp sNE[2] = {v.N, v.E}, sND[2] = {v.N, v.D}, sE[1] = {v.E};
    if (!(arr[4] = rd_new_array(1, sE, NPY_INT64))) goto fail;
    if (what >= 1 && !(arr[0] = rd_new_array(2, sNE, NPY_BOOL))) goto fail;
    if (what >= 2 && (!(arr[1] = rd_new_array(2, sNE, NPY_FLOAT32)) ||
                      !(arr[2] = rd_new_array(2, sNE, NPY_FLOAT32)) ||
                      !(arr[3] = rd_new_array(2, sND, NPY_FLOAT32))))
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    s = what >= 1 ? dl_down(arr[0], v.mask) : RD_OK;
    if (s == RD_OK && what >= 2) s = dl_down(arr[1], v.G);
    if (s == RD_OK && what >= 2) s = dl_down(arr[2], v.R);
    if (s == RD_OK && what >= 2) s = dl_down(arr[3], v.h);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); goto fail; }
    if (v.counts) memcpy(PyArray_DATA(arr[4]), v.counts, (size_t)v.E * sizeof(int64_t));
    else memset(PyArray_DATA(arr[4]), 0, (size_t)v.E * sizeof(int64_t));
    const char *names[5] = {"mask", "G", "R", "h", "counts"};
    for (int i = 0; i < 5; i++)
        if (arr[i]) PyDict_SetItemString(d, names[i], (PyObject *)arr[i]);
    t = PyLong_FromLongLong((long long)v.P);
    PyDict_SetItemString(d, "P", t); Py_XDECREF(t);
    for (int i = 0; i < 5; i++) Py_XDECREF(arr[i]);
    return d;
fail:
    for (int i = 0; i < 5; i++) Py_XDECREF(arr[i]);
    Py_XDECREF(d);
    return NULL;
}

static PyObject *moe_set_threshold(rd_moe_cuda_state *st, PyObject *args) {
    PyObject *o_st, *o_tau;
    if (!PyArg_ParseTuple(args, "OO:cuda_moe_set_threshold", &o_st, &o_tau)) return NULL;
    rd_status s;
    if (o_tau == Py_None) {
        s = rd_moe_set_threshold_cuda(st, NULL);
    } else {
        double tau;
        if (rd_parse_real(o_tau, "tau", &tau) < 0) return NULL;
        float f = (float)tau;
        s = rd_moe_set_threshold_cuda(st, &f);
    }
    if (s != RD_OK) return rd_raise(s);
    Py_RETURN_NONE;
}

static int dict_put(PyObject *d, const char *k, PyObject *v) {
    if (!v) return -1;
    int r = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return r;
}

static PyObject *loss_value(int has, float v) {
    if (has) return PyFloat_FromDouble((double)v);
    Py_RETURN_NONE;
}

/* cuda_moe_aux(state, plr_dim) -> the dict of racedit.MoE.aux for the last device forward
 * (None before any). */
static PyObject *moe_aux(rd_moe_cuda_state *st, PyObject *args) {
    PyObject *o_st;
    long long plr_dim;
    if (!PyArg_ParseTuple(args, "OL:cuda_moe_aux", &o_st, &plr_dim)) return NULL;
    rd_moe_cuda_view v;
    rd_moe_aux a;
    rd_status s = rd_moe_cuda_state_view(st, &v);
    if (s == RD_OK) s = rd_moe_cuda_get_aux(st, &a);
    if (s != RD_OK) return rd_raise(s);
    if (!v.have_forward) Py_RETURN_NONE;
    npy_intp se[1] = {(npy_intp)a.E}, sp[3] = {v.B, v.L, (npy_intp)plr_dim};
    PyArrayObject *load = rd_new_array(1, se, NPY_INT64), *pred = NULL;
    PyObject *d = PyDict_New();
    if (!load || !d) goto fail;
    if (a.E) memcpy(PyArray_DATA(load), a.load, (size_t)a.E * sizeof(int64_t));
    if (a.plr_pred && a.plr_dim == plr_dim && plr_dim > 0) {
        if (!(pred = rd_new_array(3, sp, NPY_FLOAT32))) goto fail;
        rd_status s2;
        Py_BEGIN_ALLOW_THREADS
        s2 = rd_cuda_d2h(PyArray_DATA(pred), a.plr_pred, (size_t)PyArray_NBYTES(pred));
        Py_END_ALLOW_THREADS
        if (s2 != RD_OK) { rd_raise(s2); goto fail; }
    }
    if (dict_put(d, "sim_loss", loss_value(a.has_sim, a.sim_loss)) ||
        dict_put(d, "balance_loss", loss_value(a.has_balance, a.balance_loss)) ||
        dict_put(d, "plr_loss", loss_value(a.has_plr, a.plr_loss)) ||
        dict_put(d, "aux_loss", PyFloat_FromDouble((double)a.aux_loss)) ||
        dict_put(d, "max_violation", PyFloat_FromDouble(a.max_violation)) ||
        dict_put(d, "combination_usage", PyFloat_FromDouble(a.combination_usage)) ||
        dict_put(d, "dead_experts", PyLong_FromLongLong((long long)a.dead_experts)) ||
        dict_put(d, "experts_per_token", PyFloat_FromDouble(a.experts_per_token)) ||
        dict_put(d, "expert_load", Py_NewRef((PyObject *)load)) ||
        dict_put(d, "threshold", v.have_tau ? PyFloat_FromDouble((double)a.tau) : Py_NewRef(Py_None)) ||
        dict_put(d, "batch_threshold", v.have_tau ? PyFloat_FromDouble((double)a.tau_b) : Py_NewRef(Py_None)) ||
        dict_put(d, "plr_pred", pred ? Py_NewRef((PyObject *)pred) : Py_NewRef(Py_None)) ||
        dict_put(d, "training", PyBool_FromLong(a.training)))
        goto fail;
    Py_DECREF(load);
    Py_XDECREF(pred);
    return d;
fail:
    Py_XDECREF(load);
    Py_XDECREF(pred);
    Py_XDECREF(d);
    return NULL;
}

/* cuda_moe_precision(state[, prec]) -> the previous precision (int); sets it when given. */
static PyObject *moe_precision(rd_moe_cuda_state *st, PyObject *args) {
    PyObject *o_st;
    int prec = -1;
    if (!PyArg_ParseTuple(args, "O|i:cuda_moe_precision", &o_st, &prec)) return NULL;
    int prev = rd_moe_cuda_get_precision(st);
    if (prec != -1) {
        if (check_precision(prec) < 0) return NULL;
        rd_status s = rd_moe_cuda_set_precision(st, prec);
        if (s != RD_OK) return rd_raise(s);
    }
    return PyLong_FromLong(prev);
}

/* fn(state, args) with the state capsule args[0] claimed: the view, threshold, aux and
 * precision functions read or change a state that another thread's forward may be using
 * (and copying out may release the GIL). */
static PyObject *with_state(PyObject *args, PyObject *(*fn)(rd_moe_cuda_state *, PyObject *)) {
    if (PyTuple_GET_SIZE(args) < 1) {
        PyErr_SetString(PyExc_TypeError, "state: missing (the first argument)");
        return NULL;
    }
    cstate_box *sb = take_state(PyTuple_GET_ITEM(args, 0));
    if (!sb) return NULL;
    PyObject *ret = fn(sb->st, args);
    rd_give(sb->busy);
    return ret;
}

#define WITH_STATE(fn) \
    static PyObject *py_##fn(PyObject *self, PyObject *args) { (void)self; return with_state(args, fn); }
WITH_STATE(moe_view)
WITH_STATE(moe_set_threshold)
WITH_STATE(moe_aux)
WITH_STATE(moe_precision)
#undef WITH_STATE

/* ---- DiT layers and the optimiser ----------------------------------------------------
 * One runner: upload the inputs, allocate the outputs on the device (zeros, or the
 * output's own contents when `keep` says so), run the op, download the outputs. */
typedef rd_status (*op_fn)(void **in, void **out, const int64_t *z, const double *f);

static PyObject *run_op(PyArrayObject **in, int nin, PyArrayObject **out, const int *keep, int nout,
                        op_fn fn, const int64_t *z, const double *f) {
    dlist L = {{0}, 0};
    rd_status s = RD_OK;
    Py_BEGIN_ALLOW_THREADS
    void *din[8], *dout[8];
    for (int i = 0; i < nin && s == RD_OK; i++) s = dl_up(&L, &din[i], in[i]);
    for (int i = 0; i < nout && s == RD_OK; i++) {
        if (keep && keep[i]) {
            s = dl_up(&L, &dout[i], out[i]);
        } else {
            s = dl_alloc(&L, &dout[i], (size_t)PyArray_NBYTES(out[i]));
            if (s == RD_OK) s = rd_cuda_memset(dout[i], 0, (size_t)PyArray_NBYTES(out[i]));
        }
    }
    if (s == RD_OK) s = fn(din, dout, z, f);
    for (int i = 0; i < nout && s == RD_OK; i++) s = dl_down(out[i], dout[i]);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) return rd_raise(s);
    Py_RETURN_NONE;
}

/* The result: one array or a tuple; takes over the references of out[]. */
static PyObject *result_of(PyObject *ran, PyArrayObject **out, int nout) {
    if (!ran) {
        for (int i = 0; i < nout; i++) Py_XDECREF(out[i]);
        return NULL;
    }
    Py_DECREF(ran);
    if (nout == 1) return (PyObject *)out[0];
    PyObject *t = PyTuple_New(nout);
    if (!t) {
        for (int i = 0; i < nout; i++) Py_XDECREF(out[i]);
        return NULL;
    }
    for (int i = 0; i < nout; i++) PyTuple_SET_ITEM(t, i, (PyObject *)out[i]);
    return t;
}

static void decref_all(PyArrayObject **a, int n) {
    for (int i = 0; i < n; i++) Py_XDECREF(a[i]);
}

static rd_status op_ln_f(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_layernorm_forward_cuda(out[0], out[1], in[0], z[0], z[1]);
}
static rd_status op_ln_b(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_layernorm_backward_cuda(out[0], in[0], in[1], in[2], z[0], z[1]);
}
static rd_status op_mod_f(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_modulate_forward_cuda(out[0], in[0], in[1], in[2], z[0], z[1], z[2], z[3]);
}
static rd_status op_mod_b(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_modulate_backward_cuda(out[0], out[1], out[2], in[0], in[1], in[2], z[0], z[1], z[2], z[3]);
}
static rd_status op_gr_f(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_gated_residual_forward_cuda(out[0], in[0], in[1], in[2], z[0], z[1], z[2], z[3]);
}
static rd_status op_gr_b(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_gated_residual_backward_cuda(out[0], out[1], in[0], in[1], in[2], z[0], z[1], z[2], z[3]);
}
static rd_status op_silu_f(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_silu_forward_cuda(out[0], in[0], z[0]);
}
static rd_status op_silu_b(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_silu_backward_cuda(out[0], in[0], in[1], z[0]);
}
static rd_status op_temb(void **in, void **out, const int64_t *z, const double *f) {
    return rd_timestep_embedding_forward_cuda(out[0], in[0], z[0], z[1], (float)f[0]);
}
/* z = B, L, D, NH, bf16 (0 | 1): the bf16 variants allocate their scratch per call */
static rd_status op_att_f(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    if (!z[4]) return rd_attention_forward_cuda(out[0], out[1], in[0], z[0], z[1], z[2], z[3]);
    void *ws;
    rd_status s = rd_cuda_malloc(&ws, rd_attention_bf16_scratch(z[0], z[1], z[2], z[3]));
    if (s != RD_OK) return s;
    s = rd_attention_forward_bf16_cuda(out[0], out[1], in[0], ws, z[0], z[1], z[2], z[3]);
    rd_cuda_free(ws); /* cudaFree waits for the queued work */
    return s;
}
static rd_status op_att_b(void **in, void **out, const int64_t *z, const double *f) {
    (void)f; /* out[1] is the scratch datt */
    if (!z[4])
        return rd_attention_backward_cuda(out[0], out[1], in[0], in[1], in[2], z[0], z[1], z[2], z[3]);
    void *ws;
    rd_status s = rd_cuda_malloc(&ws, rd_attention_bf16_scratch(z[0], z[1], z[2], z[3]));
    if (s != RD_OK) return s;
    s = rd_attention_backward_bf16_cuda(out[0], out[1], in[0], in[1], in[2], ws, z[0], z[1], z[2],
                                        z[3]);
    rd_cuda_free(ws); /* cudaFree waits for the queued work */
    return s;
}
static rd_status op_adamw(void **in, void **out, const int64_t *z, const double *f) {
    /* out: params, m, v[, ema]; in: grads */
    return rd_adamw_ema_step_cuda(out[0], in[0], out[1], out[2], z[1] ? out[3] : NULL, z[0], f[0],
                                  f[1], f[2], f[3], f[4], z[2], f[5], f[6]);
}
static rd_status op_norm(void **in, void **out, const int64_t *z, const double *f) {
    (void)f;
    return rd_grad_norm_cuda(out[0], in[0], z[0]);
}

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O:cuda_layernorm_forward", &o)) return NULL;
    npy_intp sh[2] = {RD_ANY, RD_ANY};
    PyArrayObject *in[1] = {rd_in_array(o, "inp", NPY_FLOAT32, 2, sh)}, *out[2] = {0};
    if (!in[0] || need_device() < 0) { decref_all(in, 1); return NULL; }
    int64_t z[2] = {PyArray_DIM(in[0], 0), PyArray_DIM(in[0], 1)};
    if (z[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "inp: expected D >= 1 columns");
        decref_all(in, 1);
        return NULL;
    }
    npy_intp sr[1] = {(npy_intp)z[0]};
    out[0] = rd_new_array(2, PyArray_DIMS(in[0]), NPY_FLOAT32);
    out[1] = rd_new_array(1, sr, NPY_FLOAT32);
    PyObject *ran = (out[0] && out[1]) ? run_op(in, 1, out, NULL, 2, op_ln_f, z, NULL) : NULL;
    decref_all(in, 1);
    return result_of(ran, out, 2);
}

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[3], *oacc = Py_None;
    if (!PyArg_ParseTuple(args, "OOO|O:cuda_layernorm_backward", &o[0], &o[1], &o[2], &oacc)) return NULL;
    npy_intp sh[2] = {RD_ANY, RD_ANY};
    PyArrayObject *in[3] = {0}, *out[1] = {0};
    int keep[1] = {0};
    if (!(in[0] = rd_in_array(o[0], "dout", NPY_FLOAT32, 2, sh))) goto fail;
    if (!(in[1] = rd_in_array(o[1], "out", NPY_FLOAT32, 2, PyArray_DIMS(in[0])))) goto fail;
    npy_intp sr[1] = {PyArray_DIM(in[0], 0)};
    if (!(in[2] = rd_in_array(o[2], "rstd", NPY_FLOAT32, 1, sr))) goto fail;
    if (PyArray_DIM(in[0], 1) < 1) {
        PyErr_SetString(PyExc_ValueError, "dout: expected D >= 1 columns");
        goto fail;
    }
    if (need_device() < 0) goto fail;
    if (oacc != Py_None) {
        PyArrayObject *acc = rd_in_array(oacc, "dinp_acc", NPY_FLOAT32, 2, PyArray_DIMS(in[0]));
        if (!acc) goto fail;
        out[0] = (PyArrayObject *)PyArray_NewCopy(acc, NPY_CORDER);
        Py_DECREF(acc);
        keep[0] = 1;
    } else {
        out[0] = rd_new_array(2, PyArray_DIMS(in[0]), NPY_FLOAT32);
    }
    if (!out[0]) goto fail;
    int64_t z[2] = {PyArray_DIM(in[0], 0), PyArray_DIM(in[0], 1)};
    PyObject *ran = run_op(in, 3, out, keep, 1, op_ln_b, z, NULL);
    decref_all(in, 3);
    return result_of(ran, out, 1);
fail:
    decref_all(in, 3);
    decref_all(out, 1);
    return NULL;
}

/* x-like arrays (B,L,D) first, then per-sample rows (B,S) with S >= D; z = B, L, D, S. */
static int bld_inputs(PyObject **o, const char **names, PyArrayObject **in, int n3, int nrows,
                      int64_t *z) {
    npy_intp s3[3] = {RD_ANY, RD_ANY, RD_ANY};
    if (!(in[0] = rd_in_array(o[0], names[0], NPY_FLOAT32, 3, s3))) return -1;
    for (int i = 1; i < n3; i++)
        if (!(in[i] = rd_in_array(o[i], names[i], NPY_FLOAT32, 3, PyArray_DIMS(in[0])))) return -1;
    z[0] = PyArray_DIM(in[0], 0); z[1] = PyArray_DIM(in[0], 1); z[2] = PyArray_DIM(in[0], 2);
    z[3] = 0;
    npy_intp sr[2] = {(npy_intp)z[0], RD_ANY};
    for (int i = n3; i < n3 + nrows; i++) {
        if (!(in[i] = rd_in_array(o[i], names[i], NPY_FLOAT32, 2, sr))) return -1;
        if (i == n3) {
            z[3] = PyArray_DIM(in[i], 1);
        } else if (PyArray_DIM(in[i], 1) != z[3]) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, %lld) like %s, got (%lld, %lld)",
                         names[i], (long long)z[0], (long long)z[3], names[n3], (long long)z[0],
                         (long long)PyArray_DIM(in[i], 1));
            return -1;
        }
    }
    if (z[0] < 1 || z[1] < 1 || z[2] < 1 || z[3] < z[2] || z[0] > 65535) {
        PyErr_Format(PyExc_ValueError, "%s, %s: expected B (<= 65535), L, D >= 1 and a row stride "
                     "S >= D, got B=%lld L=%lld D=%lld S=%lld", names[0], names[n3], (long long)z[0],
                     (long long)z[1], (long long)z[2], (long long)z[3]);
        return -1;
    }
    return need_device();
}

static PyObject *bld_op(PyObject *args, const char *fmt, const char **names, int n3, int nrows,
                        int nout3, int noutrows, op_fn fn) {
    PyObject *o[3] = {0};
    PyArrayObject *in[3] = {0}, *out[3] = {0};
    int nin = n3 + nrows, nout = nout3 + noutrows;
    int64_t z[4];
    if (!PyArg_ParseTuple(args, fmt, &o[0], &o[1], &o[2])) return NULL;
    if (bld_inputs(o, names, in, n3, nrows, z) < 0) goto fail;
    npy_intp sr[2] = {(npy_intp)z[0], (npy_intp)z[3]};
    for (int i = 0; i < nout; i++)
        if (!(out[i] = i < nout3 ? rd_new_array(3, PyArray_DIMS(in[0]), NPY_FLOAT32)
                                 : rd_new_array(2, sr, NPY_FLOAT32)))
            goto fail;
    PyObject *ran = run_op(in, nin, out, NULL, nout, fn, z, NULL);
    decref_all(in, 3);
    return result_of(ran, out, nout);
fail:
    decref_all(in, 3);
    decref_all(out, 3);
    return NULL;
}

static PyObject *py_modulate_forward(PyObject *self, PyObject *args) {
    (void)self;
    const char *names[3] = {"inp", "shift", "scale"};
    return bld_op(args, "OOO:cuda_modulate_forward", names, 1, 2, 1, 0, op_mod_f);
}
static PyObject *py_modulate_backward(PyObject *self, PyObject *args) {
    (void)self;
    const char *names[3] = {"dout", "inp", "scale"};
    return bld_op(args, "OOO:cuda_modulate_backward", names, 2, 1, 1, 2, op_mod_b);
}
static PyObject *py_gated_residual_forward(PyObject *self, PyObject *args) {
    (void)self;
    const char *names[3] = {"inp", "h", "gate"};
    return bld_op(args, "OOO:cuda_gated_residual_forward", names, 2, 1, 1, 0, op_gr_f);
}
static PyObject *py_gated_residual_backward(PyObject *self, PyObject *args) {
    (void)self;
    const char *names[3] = {"dout", "h", "gate"};
    return bld_op(args, "OOO:cuda_gated_residual_backward", names, 2, 1, 1, 1, op_gr_b);
}

/* SiLU (inp) or its backward (dout, inp) on 1-d float32 arrays (racedit.cuda reshapes). */
static PyObject *py_silu(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o0, *o1 = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:cuda_silu", &o0, &o1)) return NULL;
    npy_intp s1[1] = {RD_ANY};
    int back = o1 != Py_None;
    PyArrayObject *in[2] = {0}, *out[1] = {0};
    if (!(in[0] = rd_in_array(o0, back ? "dout" : "inp", NPY_FLOAT32, 1, s1))) return NULL;
    if (back && !(in[1] = rd_in_array(o1, "inp", NPY_FLOAT32, 1, PyArray_DIMS(in[0])))) goto fail;
    if (need_device() < 0) goto fail;
    if (!(out[0] = rd_new_array(1, PyArray_DIMS(in[0]), NPY_FLOAT32))) goto fail;
    int64_t z[1] = {PyArray_DIM(in[0], 0)};
    PyObject *ran = run_op(in, back ? 2 : 1, out, NULL, 1, back ? op_silu_b : op_silu_f, z, NULL);
    decref_all(in, 2);
    return result_of(ran, out, 1);
fail:
    decref_all(in, 2);
    decref_all(out, 1);
    return NULL;
}

static PyObject *py_timestep_embedding(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o;
    long long F;
    double maxp;
    if (!PyArg_ParseTuple(args, "OLd:cuda_timestep_embedding", &o, &F, &maxp)) return NULL;
    npy_intp s1[1] = {RD_ANY};
    PyArrayObject *in[1] = {rd_in_array(o, "t", NPY_FLOAT32, 1, s1)}, *out[1] = {0};
    if (!in[0]) return NULL;
    int64_t z[2] = {PyArray_DIM(in[0], 0), F};
    if (z[0] < 1 || F < 2 || F % 2 || !(maxp > 0.0)) {
        char mp[64]; /* PyErr_Format has no %g */
        snprintf(mp, sizeof mp, "%g", maxp);
        PyErr_Format(PyExc_ValueError, "t, dim, max_period: expected B >= 1, an even dim >= 2 and "
                     "max_period > 0, got B=%lld dim=%lld max_period=%s", (long long)z[0], (long long)F, mp);
        decref_all(in, 1);
        return NULL;
    }
    if (need_device() < 0) { decref_all(in, 1); return NULL; }
    npy_intp so[2] = {(npy_intp)z[0], (npy_intp)F};
    double f[1] = {maxp};
    if (!(out[0] = rd_new_array(2, so, NPY_FLOAT32))) { decref_all(in, 1); return NULL; }
    PyObject *ran = run_op(in, 1, out, NULL, 1, op_temb, z, f);
    decref_all(in, 1);
    return result_of(ran, out, 1);
}

/* qkv (B,L,3D) with D divisible by NH; z = B, L, D, NH. */
static int qkv_sizes(PyArrayObject *qkv, long long NH, int64_t *z) {
    int64_t B = PyArray_DIM(qkv, 0), L = PyArray_DIM(qkv, 1), D3 = PyArray_DIM(qkv, 2);
    if (B < 1 || L < 1 || D3 < 3 || D3 % 3 || NH < 1 || (D3 / 3) % NH) {
        PyErr_Format(PyExc_ValueError, "qkv, num_heads: expected qkv (B, L, 3D) with B, L >= 1 and D "
                     "divisible by num_heads >= 1, got (%lld, %lld, %lld) and %lld", (long long)B,
                     (long long)L, (long long)D3, NH);
        return -1;
    }
    z[0] = B; z[1] = L; z[2] = D3 / 3; z[3] = NH;
    return need_device();
}

static PyObject *py_attention_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o;
    long long NH;
    int bf = 0;
    if (!PyArg_ParseTuple(args, "OL|p:cuda_attention_forward", &o, &NH, &bf)) return NULL;
    npy_intp s3[3] = {RD_ANY, RD_ANY, RD_ANY};
    PyArrayObject *in[1] = {rd_in_array(o, "qkv", NPY_FLOAT32, 3, s3)}, *out[2] = {0};
    int64_t z[5];
    if (!in[0] || qkv_sizes(in[0], NH, z) < 0) { decref_all(in, 1); return NULL; }
    z[4] = bf;
    npy_intp so[3] = {(npy_intp)z[0], (npy_intp)z[1], (npy_intp)z[2]},
             sa[4] = {(npy_intp)z[0], (npy_intp)NH, (npy_intp)z[1], (npy_intp)z[1]};
    out[0] = rd_new_array(3, so, NPY_FLOAT32);
    out[1] = rd_new_array(4, sa, NPY_FLOAT32);
    PyObject *ran = (out[0] && out[1]) ? run_op(in, 1, out, NULL, 2, op_att_f, z, NULL) : NULL;
    decref_all(in, 1);
    return result_of(ran, out, 2);
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[3];
    long long NH;
    int bf = 0;
    if (!PyArg_ParseTuple(args, "OOOL|p:cuda_attention_backward", &o[0], &o[1], &o[2], &NH, &bf))
        return NULL;
    npy_intp s3[3] = {RD_ANY, RD_ANY, RD_ANY};
    PyArrayObject *in[3] = {0}, *out[2] = {0};
    int64_t z[5];
    if (!(in[1] = rd_in_array(o[1], "qkv", NPY_FLOAT32, 3, s3)) || qkv_sizes(in[1], NH, z) < 0) goto fail;
    z[4] = bf;
    npy_intp so[3] = {(npy_intp)z[0], (npy_intp)z[1], (npy_intp)z[2]},
             sa[4] = {(npy_intp)z[0], (npy_intp)NH, (npy_intp)z[1], (npy_intp)z[1]};
    if (!(in[0] = rd_in_array(o[0], "dout", NPY_FLOAT32, 3, so))) goto fail;
    if (!(in[2] = rd_in_array(o[2], "att", NPY_FLOAT32, 4, sa))) goto fail;
    out[0] = rd_new_array(3, PyArray_DIMS(in[1]), NPY_FLOAT32);
    out[1] = rd_new_array(4, sa, NPY_FLOAT32);
    if (!out[0] || !out[1]) goto fail;
    PyObject *ran = run_op(in, 3, out, NULL, 2, op_att_b, z, NULL);
    decref_all(in, 3);
    if (!ran) { decref_all(out, 2); return NULL; }
    Py_DECREF(ran);
    Py_DECREF(out[1]); /* the scratch */
    return (PyObject *)out[0];
fail:
    decref_all(in, 3);
    decref_all(out, 2);
    return NULL;
}

/* cuda_adamw_step(params, grads, m, v, ema|None, lr, beta1, beta2, eps, weight_decay, step,
 * grad_scale, ema_decay): params, m, v (and ema), 1-d float32, are updated IN PLACE. */
static PyObject *py_adamw_step(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *op, *og, *om, *ov, *oe;
    double f[7];
    long long step;
    if (!PyArg_ParseTuple(args, "OOOOOdddddLdd:cuda_adamw_step", &op, &og, &om, &ov, &oe, &f[0],
                          &f[1], &f[2], &f[3], &f[4], &step, &f[5], &f[6]))
        return NULL;
    npy_intp s1[1] = {RD_ANY};
    PyArrayObject *out[4] = {0}, *in[1] = {0};
    int nout = oe == Py_None ? 3 : 4, keep[4] = {1, 1, 1, 1};
    if (!(out[0] = rd_out_array(op, "params", NPY_FLOAT32, 1, s1))) goto fail;
    Py_INCREF(out[0]);
    if (!(in[0] = rd_in_array(og, "grads", NPY_FLOAT32, 1, PyArray_DIMS(out[0])))) goto fail;
    if (!(out[1] = rd_out_array(om, "m", NPY_FLOAT32, 1, PyArray_DIMS(out[0])))) goto fail;
    Py_INCREF(out[1]);
    if (!(out[2] = rd_out_array(ov, "v", NPY_FLOAT32, 1, PyArray_DIMS(out[0])))) goto fail;
    Py_INCREF(out[2]);
    if (nout == 4) {
        if (!(out[3] = rd_out_array(oe, "ema", NPY_FLOAT32, 1, PyArray_DIMS(out[0])))) goto fail;
        Py_INCREF(out[3]);
    }
    rd_status chk = rd_adamw_check("adamw_cuda", PyArray_DIM(out[0], 0), (int64_t)step, f[1], f[2],
                                   nout == 4, f[6]);
    if (chk != RD_OK) {
        rd_raise(chk);
        goto fail;
    }
    if (need_device() < 0) goto fail;
    int64_t z[3] = {PyArray_DIM(out[0], 0), nout == 4, step};
    PyObject *ran = run_op(in, 1, out, keep, nout, op_adamw, z, f);
    decref_all(in, 1);
    decref_all(out, 4);
    return ran;
fail:
    decref_all(in, 1);
    decref_all(out, 4);
    return NULL;
}

static PyObject *py_grad_norm(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O:cuda_grad_norm", &o)) return NULL;
    npy_intp s1[1] = {RD_ANY};
    PyArrayObject *in[1] = {rd_in_array(o, "grads", NPY_FLOAT32, 1, s1)}, *out[1] = {0};
    if (!in[0] || need_device() < 0) { decref_all(in, 1); return NULL; }
    npy_intp so[1] = {1};
    if (!(out[0] = rd_new_array(1, so, NPY_FLOAT64))) { decref_all(in, 1); return NULL; }
    int64_t z[1] = {PyArray_DIM(in[0], 0)};
    PyObject *ran = run_op(in, 1, out, NULL, 1, op_norm, z, NULL);
    decref_all(in, 1);
    PyObject *arr = result_of(ran, out, 1);
    if (!arr) return NULL;
    PyObject *r = PyFloat_FromDouble(*(double *)PyArray_DATA((PyArrayObject *)arr));
    Py_DECREF(arr);
    return r;
}

static PyObject *py_nonfinite_index(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o;
    if (!PyArg_ParseTuple(args, "O:cuda_nonfinite_index", &o)) return NULL;
    npy_intp s1[1] = {RD_ANY};
    PyArrayObject *x = rd_in_array(o, "x", NPY_FLOAT32, 1, s1);
    if (!x || need_device() < 0) { Py_XDECREF(x); return NULL; }
    dlist L = {{0}, 0};
    int64_t idx = -1;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    void *d;
    s = dl_up(&L, &d, x);
    if (s == RD_OK) s = rd_nonfinite_index_cuda(&idx, d, PyArray_DIM(x, 0));
    dl_free(&L);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    if (s != RD_OK) return rd_raise(s);
    return PyLong_FromLongLong((long long)idx);
}

/* ---- knobs, info, benchmark --------------------------------------------------------- */
static PyObject *py_set_tf32(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o = Py_None;
    if (!PyArg_ParseTuple(args, "|O:cuda_tf32", &o)) return NULL;
    int prev = rd_cuda_get_tf32();
    if (o != Py_None) {
        int t = PyObject_IsTrue(o);
        if (t < 0) return NULL;
        rd_cuda_set_tf32(t);
    }
    return PyBool_FromLong(prev);
}

static PyObject *py_set_expert_gemm(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o = Py_None;
    if (!PyArg_ParseTuple(args, "|O:cuda_expert_gemm", &o)) return NULL;
    int prev = rd_cuda_get_expert_gemm();
    if (o != Py_None) {
        int64_t m;
        if (rd_parse_int(o, "mode", &m) < 0) return NULL;
        if (m < 0 || m > 2) {
            PyErr_Format(PyExc_ValueError, "mode: expected 0 (GEMM loop), 1 (grouped) or 2 (loop on "
                         "side streams), got %lld", (long long)m);
            return NULL;
        }
        if (m == 1 && !rd_cuda_have_grouped_gemm()) {
            PyErr_Format(PyExc_ValueError, "mode: cublasGemmGroupedBatchedEx is not in this cuBLAS (%d)",
                         rd_cuda_cublas_version());
            return NULL;
        }
        rd_cuda_set_expert_gemm((int)m);
    }
    return PyLong_FromLong(prev);
}

static PyObject *py_cuda_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    static const char *names[4] = {"fp32->fp32", "fp32->bf16", "bf16->fp32", "bf16->bf16"};
    PyObject *refused = PyList_New(0);
    if (!refused) return NULL;
    int mask = rd_cuda_grouped_refused_mask();
    for (int i = 0; i < 4; i++) {
        if (!(mask & (1 << i))) continue;
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s || PyList_Append(refused, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(refused);
            return NULL;
        }
        Py_DECREF(s);
    }
    return Py_BuildValue("{s:i,s:O,s:s,s:i,s:i,s:N}", "cublas_version", rd_cuda_cublas_version(),
                         "grouped_gemm", rd_cuda_have_grouped_gemm() ? Py_True : Py_False,
                         "runtime", rd_cuda_runtime_version(), "devices", rd_cuda_device_count(),
                         "grouped_fallbacks", rd_cuda_grouped_fallbacks(),
                         "grouped_refused", refused);
}

static PyObject *py_bench_moe(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_x, *o_p, *o_dy, *o_cfg;
    int iters, prec = 0;
    PyArrayObject *x = NULL, *params = NULL, *dyin = NULL;
    PyObject *ret = NULL;
    rd_moe_cfg cfg;
    if (!PyArg_ParseTuple(args, "OOOOi|i:cuda_bench_moe", &o_x, &o_p, &o_dy, &o_cfg, &iters, &prec))
        return NULL;
    if (check_precision(prec) < 0) return NULL;
    if (parse_cfg(o_cfg, &cfg) < 0) return NULL;
    if (iters < 1) {
        PyErr_Format(PyExc_ValueError, "iters: expected >= 1, got %d", iters);
        return NULL;
    }
    int64_t sizes[RD_MOE_NPARAM];
    npy_intp np[1] = {(npy_intp)rd_moe_param_sizes(sizes, &cfg)};
    npy_intp sx[3] = {RD_ANY, RD_ANY, cfg.D};
    if (!(x = rd_in_array(o_x, "x", NPY_FLOAT32, 3, sx))) return NULL;
    if (!(params = rd_in_array(o_p, "params", NPY_FLOAT32, 1, np))) goto done;
    if (!(dyin = rd_in_array(o_dy, "dy", NPY_FLOAT32, 3, PyArray_DIMS(x)))) goto done;
    if (need_device() < 0) goto done;
    rd_cuda_bench_result r;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_cuda_bench_moe(&r, PyArray_DATA(x), PyArray_DATA(params), PyArray_DATA(dyin), &cfg,
                          PyArray_DIM(x, 0), PyArray_DIM(x, 1), iters, prec);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); goto done; }
    ret = Py_BuildValue("{s:d,s:d,s:d,s:d,s:d,s:d,s:L}", "route_ms", r.route_ms, "fwd_ms", r.fwd_ms,
                        "fwdbwd_ms", r.fwdbwd_ms, "experts_fwdbwd_ms", r.experts_fwdbwd_ms,
                        "dense_fwd_ms", r.dense_fwd_ms, "dense_fwdbwd_ms", r.dense_fwdbwd_ms,
                        "P", (long long)r.P);
done:
    Py_XDECREF(x);
    Py_XDECREF(params);
    Py_XDECREF(dyin);
    return ret;
}

/* ---- the whole model ------------------------------------------------------------------
 * A capsule owning an rd_model_cuda; HOST arrays in and out (copies at the boundary). The
 * MoE blocks' states are handed out as capsules of the layer-state kind that keep the
 * model capsule alive and never free the state, so every cuda_moe_* function reads them. */
typedef struct {
    rd_model_cuda *m;
    rd_busy busy;  /* a call works on the model or one of its MoE states (take_cmodel) */
} cmodel_box;

#define CMODEL_CAPSULE "racedit.cuda_model"

static void cmodel_destructor(PyObject *cap) {
    cmodel_box *box = (cmodel_box *)PyCapsule_GetPointer(cap, CMODEL_CAPSULE);
    if (box) {
        rd_model_cuda_free(box->m);
        PyMem_Free(box);
    }
}

static cmodel_box *cmodel_of(PyObject *cap) {
    return (cmodel_box *)rd_capsule_ptr(cap, CMODEL_CAPSULE, "model", "a CUDA model capsule");
}

static cmodel_box *get_cmodel(PyObject *cap) {
    cmodel_box *box = cmodel_of(cap);
    if (box && box->busy) {
        PyErr_SetString(PyExc_RuntimeError, "model: in use by another thread");
        return NULL;
    }
    return box;
}

/* The box claimed for this call (give it back with rd_give(&box->busy)), or NULL with the
 * exception: taken before anything that may release the GIL. */
static cmodel_box *take_cmodel(PyObject *cap) {
    cmodel_box *box = cmodel_of(cap);
    if (box && rd_take(&box->busy, "model") < 0) return NULL;
    return box;
}

/* cuda_model_new(depth, hidden, heads, patch, input_size, in_channels, out_channels,
 * num_classes, num_experts=0, k=1, expert_hidden=0, strategy, gating, beta, eval_topk,
 * plr_weight, sim_weight, balance_weight): the arguments of racedit._C.model_new. */
static PyObject *py_cmodel_new(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"depth", "hidden", "heads", "patch", "input_size", "in_channels",
                          "out_channels", "num_classes", "num_experts", "k", "expert_hidden",
                          "strategy", "gating", "beta", "eval_topk", "plr_weight", "sim_weight",
                          "balance_weight", NULL};
    long long depth, D, NH, p, S, C, Co, ncls, E = 0, k = 1, He = 0;
    PyObject *ostrat = NULL, *ogate = NULL;
    float beta = 0.99f, plr_w = 1.0f, sim_w = 0.01f, bal_w = 0.0f;
    int eval_topk = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLLLLL|LLLOOfpfff:cuda_model_new", kws, &depth,
                                     &D, &NH, &p, &S, &C, &Co, &ncls, &E, &k, &He, &ostrat, &ogate,
                                     &beta, &eval_topk, &plr_w, &sim_w, &bal_w))
        return NULL;
    if (need_device() < 0) return NULL;
    rd_model_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.depth = depth, cfg.D = D, cfg.NH = NH, cfg.patch = p, cfg.input_size = S;
    cfg.in_channels = C, cfg.out_channels = Co, cfg.num_classes = ncls;
    cfg.moe.D = D, cfg.moe.E = E, cfg.moe.k = k, cfg.moe.He = He;
    cfg.moe.strategy = RD_ROUTE_RACE, cfg.moe.gating = RD_GATE_IDENTITY;
    if (ostrat && ostrat != Py_None && rd_parse_strategy(ostrat, "routing", &cfg.moe.strategy) < 0)
        return NULL;
    if (ogate && ogate != Py_None && rd_parse_gating(ogate, "gating", &cfg.moe.gating) < 0)
        return NULL;
    cfg.moe.beta = beta, cfg.moe.eval_topk = eval_topk;
    cfg.moe.plr_weight = plr_w, cfg.moe.sim_weight = sim_w, cfg.moe.balance_weight = bal_w;
    cmodel_box *box = (cmodel_box *)PyMem_Calloc(1, sizeof *box);
    if (!box) return PyErr_NoMemory();
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_model_cuda_new(&box->m, &cfg);
    Py_END_ALLOW_THREADS
    if (st) {
        PyMem_Free(box);
        return rd_raise(st);
    }
    PyObject *cap = PyCapsule_New(box, CMODEL_CAPSULE, cmodel_destructor);
    if (!cap) {
        rd_model_cuda_free(box->m);
        PyMem_Free(box);
    }
    return cap;
}

static int parse_which(int which) {
    if (which >= 0 && which < RD_MODEL_CUDA_NBUF) return 0;
    PyErr_Format(PyExc_ValueError, "which: expected 0..%d (params, grads, adam_m, adam_v, ema), got %d",
                 RD_MODEL_CUDA_NBUF - 1, which);
    return -1;
}

/* cuda_model_get(model, which) -> a float32 (n,) copy of device buffer `which`. */
static PyObject *py_cmodel_get(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    int which;
    if (!PyArg_ParseTuple(args, "Oi:cuda_model_get", &cap, &which)) return NULL;
    if (parse_which(which) < 0) return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    npy_intp n[1] = {(npy_intp)rd_model_cuda_num_params(box->m)};
    PyArrayObject *a = rd_new_array(1, n, NPY_FLOAT32);
    if (!a) {
        rd_give(&box->busy);
        return NULL;
    }
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = dl_down(a, rd_model_cuda_buffer(box->m, which));
    Py_END_ALLOW_THREADS
    rd_give(&box->busy);
    if (st) {
        Py_DECREF(a);
        return rd_raise(st);
    }
    return (PyObject *)a;
}

/* cuda_model_set(model, which, values (n,) float32): device buffer `which` = values. */
static PyObject *py_cmodel_set(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ov;
    int which;
    if (!PyArg_ParseTuple(args, "OiO:cuda_model_set", &cap, &which, &ov)) return NULL;
    if (parse_which(which) < 0) return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    npy_intp n[1] = {(npy_intp)rd_model_cuda_num_params(box->m)};
    PyArrayObject *a = rd_in_array(ov, "values", NPY_FLOAT32, 1, n);
    if (!a) {
        rd_give(&box->busy);
        return NULL;
    }
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_cuda_h2d(rd_model_cuda_buffer(box->m, which), PyArray_DATA(a), (size_t)PyArray_NBYTES(a));
    Py_END_ALLOW_THREADS
    rd_give(&box->busy);
    Py_DECREF(a);
    if (st) return rd_raise(st);
    Py_RETURN_NONE;
}

static PyObject *py_cmodel_num_params(PyObject *self, PyObject *cap) {
    (void)self;
    cmodel_box *box = get_cmodel(cap);
    if (!box) return NULL;
    return PyLong_FromLongLong((long long)rd_model_cuda_num_params(box->m));
}

/* cuda_model_reserve(model, max_batch, fixed) */
static PyObject *py_cmodel_reserve(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    long long mb;
    int fixed;
    if (!PyArg_ParseTuple(args, "OLp:cuda_model_reserve", &cap, &mb, &fixed)) return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_model_cuda_reserve(box->m, (int64_t)mb, fixed);
    Py_END_ALLOW_THREADS
    rd_give(&box->busy);
    if (st) return rd_raise(st);
    Py_RETURN_NONE;
}

/* cuda_model_batch(model) -> (max_batch, last_batch) */
static PyObject *py_cmodel_batch(PyObject *self, PyObject *cap) {
    (void)self;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    const long long mb = (long long)rd_model_cuda_max_batch(box->m);
    const long long last = (long long)rd_model_cuda_last_batch(box->m);
    rd_give(&box->busy);
    return Py_BuildValue("(LL)", mb, last);
}

/* cuda_model_branch_norms(model) -> (depth, 2) float64 (rd_model_cuda_branch_norms). */
static rd_status fill_cbranch_norms(void *m, double *out) {
    return rd_model_cuda_branch_norms(m, out);
}
static PyObject *py_cmodel_branch_norms(PyObject *self, PyObject *cap) {
    (void)self;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    PyObject *ret = rd_f64_result(rd_model_config(rd_model_cuda_layout(box->m))->depth, 2,
                                  fill_cbranch_norms, box->m);
    rd_give(&box->busy);
    return ret;
}

/* Validated inputs x (B,C,S,S) f32, t (B,) f32, y (B,) i64 and an optional (B,C,S,S) f32. */
static int cmodel_inputs(cmodel_box *box, PyObject *ox, PyObject *ot, PyObject *oy, PyObject *oz,
                         const char *zname, PyArrayObject **a, int64_t *B) {
    const rd_model_cfg *c = rd_model_config(rd_model_cuda_layout(box->m));
    const npy_intp S = (npy_intp)c->input_size, C = (npy_intp)c->in_channels;
    npy_intp sx[4] = {RD_ANY, C, S, S};
    if (!(a[0] = rd_in_array(ox, "x", NPY_FLOAT32, 4, sx))) return -1;
    *B = PyArray_DIM(a[0], 0);
    if (*B < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected a batch of at least 1 image");
        return -1;
    }
    npy_intp sb[1] = {(npy_intp)*B}, sz[4] = {(npy_intp)*B, C, S, S};
    if (!(a[1] = rd_in_array(ot, "t", NPY_FLOAT32, 1, sb))) return -1;
    if (!(a[2] = rd_in_array(oy, "y", NPY_INT64, 1, sb))) return -1;
    if (oz && oz != Py_None && !(a[3] = rd_in_array(oz, zname, NPY_FLOAT32, 4, sz))) return -1;
    return 0;
}

/* out (B,Co,S,S) of x, t, y (and plr_target, None or an array): rd_model_cuda_forward, or
 * with `infer` rd_model_cuda_infer (plr_target None), run with the GIL released. */
static PyObject *cmodel_run(PyObject *cap, PyObject *ox, PyObject *ot, PyObject *oy,
                            PyObject *oplr, int training, int infer) {
    PyObject *ret = NULL;
    PyArrayObject *a[4] = {0}, *out = NULL;
    int64_t B = 0;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    const rd_model_cfg *c = rd_model_config(rd_model_cuda_layout(box->m));
    if (cmodel_inputs(box, ox, ot, oy, oplr, "plr_target", a, &B) < 0) goto done;
    {
        npy_intp so[4] = {(npy_intp)B, (npy_intp)c->out_channels, (npy_intp)c->input_size,
                          (npy_intp)c->input_size};
        if (!(out = rd_new_array(4, so, NPY_FLOAT32))) goto done;
        float *o = (float *)PyArray_DATA(out);
        const float *x = (const float *)PyArray_DATA(a[0]), *t = (const float *)PyArray_DATA(a[1]);
        const int64_t *y = (const int64_t *)PyArray_DATA(a[2]);
        rd_status st;
        Py_BEGIN_ALLOW_THREADS
        st = infer ? rd_model_cuda_infer(box->m, o, x, t, y, B)
                   : rd_model_cuda_forward(box->m, o, x, t, y,
                                           a[3] ? (const float *)PyArray_DATA(a[3]) : NULL, B,
                                           training);
        Py_END_ALLOW_THREADS
        if (st) { rd_raise(st); goto done; }
    }
    ret = (PyObject *)out;
    out = NULL;
done:
    rd_give(&box->busy);
    for (int i = 0; i < 4; i++) Py_XDECREF(a[i]);
    Py_XDECREF(out);
    return ret;
}

/* cuda_model_forward(model, x, t, y, plr_target=None, training=True) -> out (B,Co,S,S) */
static PyObject *py_cmodel_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ox, *ot, *oy, *oplr = Py_None;
    int training = 1;
    if (!PyArg_ParseTuple(args, "OOOO|Op:cuda_model_forward", &cap, &ox, &ot, &oy, &oplr, &training))
        return NULL;
    return cmodel_run(cap, ox, ot, oy, oplr, training, 0);
}

/* cuda_model_infer(model, x, t, y) -> out (B,Co,S,S): rd_model_cuda_infer. */
static PyObject *py_cmodel_infer(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ox, *ot, *oy;
    if (!PyArg_ParseTuple(args, "OOOO:cuda_model_infer", &cap, &ox, &ot, &oy)) return NULL;
    return cmodel_run(cap, ox, ot, oy, Py_None, 0, 1);
}

/* cuda_model_infer_release(model): free the inference arena. */
static PyObject *py_cmodel_infer_release(PyObject *self, PyObject *cap) {
    (void)self;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    rd_model_cuda_infer_release(box->m);
    rd_give(&box->busy);
    Py_RETURN_NONE;
}

/* cuda_model_infer_batch(model) -> batch of the inference arena (0: none). */
static PyObject *py_cmodel_infer_batch(PyObject *self, PyObject *cap) {
    (void)self;
    cmodel_box *box = get_cmodel(cap);
    return box ? PyLong_FromLongLong((long long)rd_model_cuda_infer_batch(box->m)) : NULL;
}

/* cuda_model_backward(model, dout (B,Co,S,S)): device grads += ... */
static PyObject *py_cmodel_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *od;
    if (!PyArg_ParseTuple(args, "OO:cuda_model_backward", &cap, &od)) return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    const rd_model_cfg *c = rd_model_config(rd_model_cuda_layout(box->m));
    const int64_t B = rd_model_cuda_last_batch(box->m);
    if (B == 0) {
        rd_give(&box->busy);
        PyErr_SetString(PyExc_RuntimeError, "backward called before forward");
        return NULL;
    }
    npy_intp sd[4] = {(npy_intp)B, (npy_intp)c->out_channels, (npy_intp)c->input_size,
                      (npy_intp)c->input_size};
    PyArrayObject *d = rd_in_array(od, "dout", NPY_FLOAT32, 4, sd);
    if (!d) {
        rd_give(&box->busy);
        return NULL;
    }
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_model_cuda_backward(box->m, (const float *)PyArray_DATA(d));
    Py_END_ALLOW_THREADS
    rd_give(&box->busy);
    Py_DECREF(d);
    if (st) return rd_raise(st);
    Py_RETURN_NONE;
}

/* cuda_model_train_step(model, x, t, y, target, lr, beta1, beta2, eps, weight_decay,
 * max_grad_norm, ema_decay) -> {"loss", "grad_norm" (None when not clipping), "step"} */
static PyObject *py_cmodel_train_step(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ox, *ot, *oy, *oz, *ret = NULL;
    PyArrayObject *a[4] = {0};
    rd_model_cuda_opt o;
    int64_t B = 0;
    if (!PyArg_ParseTuple(args, "OOOOOddddddd:cuda_model_train_step", &cap, &ox, &ot, &oy, &oz,
                          &o.lr, &o.beta1, &o.beta2, &o.eps, &o.weight_decay, &o.max_grad_norm,
                          &o.ema_decay))
        return NULL;
    if (oz == Py_None) {
        PyErr_SetString(PyExc_TypeError, "target: expected a float32 array, got None");
        return NULL;
    }
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    if (cmodel_inputs(box, ox, ot, oy, oz, "target", a, &B) < 0) goto done;
    {
        rd_model_cuda_step_out r;
        rd_status st;
        Py_BEGIN_ALLOW_THREADS
        st = rd_model_cuda_train_step(box->m, &r, (const float *)PyArray_DATA(a[0]),
                                      (const float *)PyArray_DATA(a[1]),
                                      (const int64_t *)PyArray_DATA(a[2]),
                                      (const float *)PyArray_DATA(a[3]), B, &o);
        Py_END_ALLOW_THREADS
        if (st) { rd_raise(st); goto done; }
        PyObject *gn = isnan(r.grad_norm) ? Py_NewRef(Py_None) : PyFloat_FromDouble(r.grad_norm);
        ret = Py_BuildValue("{s:d,s:N,s:L}", "loss", r.loss, "grad_norm", gn, "step",
                            (long long)r.step);
    }
done:
    rd_give(&box->busy);
    for (int i = 0; i < 4; i++) Py_XDECREF(a[i]);
    return ret;
}

/* cuda_model_optimizer_step(model, lr, beta1, beta2, eps, weight_decay, max_grad_norm,
 * ema_decay) -> {"grad_norm" (None when not clipping), "step"} */
static PyObject *py_cmodel_optimizer_step(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    rd_model_cuda_opt o;
    if (!PyArg_ParseTuple(args, "Oddddddd:cuda_model_optimizer_step", &cap, &o.lr, &o.beta1,
                          &o.beta2, &o.eps, &o.weight_decay, &o.max_grad_norm, &o.ema_decay))
        return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    rd_model_cuda_step_out r;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_model_cuda_optimizer_step(box->m, &r, &o);
    Py_END_ALLOW_THREADS
    rd_give(&box->busy);
    if (st) return rd_raise(st);
    PyObject *gn = isnan(r.grad_norm) ? Py_NewRef(Py_None) : PyFloat_FromDouble(r.grad_norm);
    return Py_BuildValue("{s:N,s:L}", "grad_norm", gn, "step", (long long)r.step);
}

static void borrowed_state_destructor(PyObject *cap) {
    cstate_box *b = (cstate_box *)PyCapsule_GetPointer(cap, STATE_CAPSULE);
    if (b) {
        Py_XDECREF(b->x);
        PyMem_Free(b);
    }
    Py_XDECREF((PyObject *)PyCapsule_GetContext(cap));
}

/* cuda_model_moe_state(model, l) -> the state capsule of MoE block l (cuda_moe_* read it). */
static PyObject *py_cmodel_moe_state(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    long long l;
    if (!PyArg_ParseTuple(args, "OL:cuda_model_moe_state", &cap, &l)) return NULL;
    cmodel_box *box = get_cmodel(cap);
    if (!box) return NULL;
    rd_moe_cuda_state *st = rd_model_cuda_moe_state(box->m, (int64_t)l);
    if (!st) {
        PyErr_Format(PyExc_IndexError, "layer %lld: the model has %lld MoE blocks", l,
                     (long long)rd_model_cuda_num_moe(box->m));
        return NULL;
    }
    cstate_box *b = (cstate_box *)PyMem_Calloc(1, sizeof *b);
    if (!b) return PyErr_NoMemory();
    b->st = st;
    b->busy = &box->busy;  /* the model's forward works on this state too */
    PyObject *sc = PyCapsule_New(b, STATE_CAPSULE, borrowed_state_destructor);
    if (!sc) {
        PyMem_Free(b);
        return NULL;
    }
    if (PyCapsule_SetContext(sc, Py_NewRef(cap)) < 0) {
        Py_DECREF(cap);
        Py_DECREF(sc);
        return NULL;
    }
    return sc;
}

/* cuda_model_precision(model, prec): the model's GEMM precision (rd_model_cuda_set_precision). */
static PyObject *py_cmodel_precision(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    int prec;
    if (!PyArg_ParseTuple(args, "Oi:cuda_model_precision", &cap, &prec)) return NULL;
    if (check_precision(prec) < 0) return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    rd_status st = rd_model_cuda_set_precision(box->m, prec);
    rd_give(&box->busy);
    if (st) return rd_raise(st);
    Py_RETURN_NONE;
}

/* cuda_model_step(model[, step]) -> AdamW steps taken (before setting). */
static PyObject *py_cmodel_step(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *os = NULL;
    if (!PyArg_ParseTuple(args, "O|O:cuda_model_step", &cap, &os)) return NULL;
    int64_t s = 0;
    if (os && rd_parse_int(os, "step", &s) < 0) return NULL;
    cmodel_box *box = take_cmodel(cap);
    if (!box) return NULL;
    long long prev = (long long)rd_model_cuda_get_step(box->m);
    rd_status st = os ? rd_model_cuda_set_step(box->m, s) : RD_OK;
    rd_give(&box->busy);
    if (st) return rd_raise(st);
    return PyLong_FromLongLong(prev);
}

static PyMethodDef cuda_methods[] = {
    {"cuda_model_new", (PyCFunction)(void (*)(void))py_cmodel_new, METH_VARARGS | METH_KEYWORDS,
     "A device RaceDiT (capsule); the arguments of model_new."},
    {"cuda_model_get", py_cmodel_get, METH_VARARGS, "A host copy of a device buffer (0 params, 1 grads, 2 adam_m, 3 adam_v, 4 ema)."},
    {"cuda_model_set", py_cmodel_set, METH_VARARGS, "Upload a device buffer (0 params, 1 grads, 2 adam_m, 3 adam_v, 4 ema)."},
    {"cuda_model_num_params", py_cmodel_num_params, METH_O, "Floats in the parameter buffer."},
    {"cuda_model_reserve", py_cmodel_reserve, METH_VARARGS, "Allocate device activations for max_batch."},
    {"cuda_model_batch", py_cmodel_batch, METH_O, "(max_batch, last_batch)."},
    {"cuda_model_branch_norms", py_cmodel_branch_norms, METH_O,
     "(depth, 2) mean norms of the gated attention / FFN outputs of the last forward."},
    {"cuda_model_forward", py_cmodel_forward, METH_VARARGS, "out = model(x, t, y) on the GPU."},
    {"cuda_model_infer", py_cmodel_infer, METH_VARARGS,
     "out = the eval-mode model(x, t, y) on the GPU, keeping nothing for backward."},
    {"cuda_model_infer_release", py_cmodel_infer_release, METH_O, "Free the inference arena."},
    {"cuda_model_infer_batch", py_cmodel_infer_batch, METH_O, "Batch of the inference arena."},
    {"cuda_model_backward", py_cmodel_backward, METH_VARARGS, "Device grads += backward of dout."},
    {"cuda_model_train_step", py_cmodel_train_step, METH_VARARGS, "One device training step; the loss back."},
    {"cuda_model_optimizer_step", py_cmodel_optimizer_step, METH_VARARGS, "Clip + AdamW + EMA on the device grads."},
    {"cuda_model_moe_state", py_cmodel_moe_state, METH_VARARGS, "The state capsule of MoE block l."},
    {"cuda_model_precision", py_cmodel_precision, METH_VARARGS, "GEMM precision of the model."},
    {"cuda_model_step", py_cmodel_step, METH_VARARGS, "AdamW step count (get, optionally set)."},
    {"cuda_route", py_route, METH_VARARGS, "(mask, tau_b) = route on the GPU (see racedit.cuda.route)."},
    {"cuda_route_threshold", py_route_threshold, METH_VARARGS, "scores >= tau on the GPU."},
    {"cuda_gate_forward", py_gate_forward, METH_VARARGS, "G = gate(R) on the GPU."},
    {"cuda_gate_backward", py_gate_backward, METH_VARARGS, "dR from dG, G on the GPU."},
    {"cuda_router_forward", py_router_forward, METH_VARARGS, "(hpre, h, R) on the GPU."},
    {"cuda_router_backward", py_router_backward, METH_VARARGS, "(dx, dWr, dbr, dWg, dbg) on the GPU."},
    {"cuda_experts_forward", py_experts_forward, METH_VARARGS, "y of the dropless experts on the GPU."},
    {"cuda_experts_backward", py_experts_backward, METH_VARARGS, "(dx, dG, dw1, db1, dw2, db2) on the GPU."},
    {"cuda_moe_state", py_moe_state, METH_NOARGS, "A new device MoE layer state (capsule)."},
    {"cuda_moe_forward", py_moe_forward, METH_VARARGS, "y = MoE layer forward on the GPU."},
    {"cuda_moe_backward", py_moe_backward, METH_VARARGS, "dx; grads accumulate in place."},
    {"cuda_moe_view", py_moe_view, METH_VARARGS, "What the last device forward left (dict)."},
    {"cuda_moe_set_threshold", py_moe_set_threshold, METH_VARARGS, "Set (float) or forget (None) tau."},
    {"cuda_layernorm_forward", py_layernorm_forward, METH_VARARGS, "(out, rstd) = LayerNorm of inp (N,D) on the GPU."},
    {"cuda_layernorm_backward", py_layernorm_backward, METH_VARARGS, "dinp (+= dinp_acc) of LayerNorm on the GPU."},
    {"cuda_modulate_forward", py_modulate_forward, METH_VARARGS, "adaLN modulate on the GPU."},
    {"cuda_modulate_backward", py_modulate_backward, METH_VARARGS, "(dinp, dshift, dscale) on the GPU."},
    {"cuda_gated_residual_forward", py_gated_residual_forward, METH_VARARGS, "inp + gate * h on the GPU."},
    {"cuda_gated_residual_backward", py_gated_residual_backward, METH_VARARGS, "(dh, dgate) on the GPU."},
    {"cuda_silu", py_silu, METH_VARARGS, "SiLU (inp) or its backward (dout, inp) on 1-d arrays on the GPU."},
    {"cuda_timestep_embedding", py_timestep_embedding, METH_VARARGS, "Sinusoidal timestep embedding on the GPU."},
    {"cuda_attention_forward", py_attention_forward, METH_VARARGS, "(out, att) of multi-head attention on the GPU (bf16 operands when the flag is true)."},
    {"cuda_attention_backward", py_attention_backward, METH_VARARGS, "dqkv of multi-head attention on the GPU (bf16 operands when the flag is true)."},
    {"cuda_adamw_step", py_adamw_step, METH_VARARGS, "AdamW (+ EMA) step in place on the GPU."},
    {"cuda_grad_norm", py_grad_norm, METH_VARARGS, "sqrt(sum grads^2) on the GPU."},
    {"cuda_nonfinite_index", py_nonfinite_index, METH_VARARGS, "First non-finite index or -1, on the GPU."},
    {"cuda_moe_aux", py_moe_aux, METH_VARARGS, "Aux losses and diagnostics of the last device forward (dict)."},
    {"cuda_moe_precision", py_moe_precision, METH_VARARGS, "Read / set a state's expert precision (0 fp32, 1 tf32, 2 bf16)."},
    {"cuda_tf32", py_set_tf32, METH_VARARGS, "Read / set TF32 GEMMs; returns the previous value."},
    {"cuda_expert_gemm", py_set_expert_gemm, METH_VARARGS, "Read / set the expert GEMM mode."},
    {"cuda_info", py_cuda_info, METH_NOARGS, "cuBLAS version, grouped GEMM, runtime, devices."},
    {"cuda_bench_moe", py_bench_moe, METH_VARARGS, "Device-resident MoE timings (dict of ms)."},
    {NULL, NULL, 0, NULL}};

int rd_bind_cuda(PyObject *m) { return PyModule_AddFunctions(m, cuda_methods); }

#else

int rd_bind_cuda(PyObject *m) { (void)m; return 0; }

#endif
