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

static int parse_int(PyObject *obj, const char *name, int64_t *out) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 0;
}

static int parse_float(PyObject *obj, const char *name, double *out) {
    if (PyBool_Check(obj) || !PyNumber_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a real number, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
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
    if (parse_int(o_k, "k", &k) < 0 || rd_parse_strategy(o_strategy, "strategy", &s) < 0) return NULL;
    if (!(scores = rd_in_array(o_scores, "scores", NPY_FLOAT32, 3, NULL))) return NULL;
    npy_intp *dims = PyArray_DIMS(scores);
    int64_t B = dims[0], Ls = dims[1], E = dims[2];
    if (B < 1 || Ls < 1 || E < 1) {
        PyErr_Format(PyExc_ValueError, "scores: expected a non-empty (B, L, E) array, got shape "
                     "(%lld, %lld, %lld)", (long long)B, (long long)Ls, (long long)E);
        goto done;
    }
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
    if (parse_float(o_tau, "tau", &tau) < 0) return NULL;
    if (tau != tau) {
        PyErr_SetString(PyExc_ValueError, "tau: expected a number, got NaN");
        return NULL;
    }
    if (!PyArray_Check(o_scores)) {
        PyErr_Format(PyExc_TypeError, "scores: expected a numpy.ndarray of dtype float32, got %s",
                     Py_TYPE(o_scores)->tp_name);
        return NULL;
    }
    int nd = PyArray_NDIM((PyArrayObject *)o_scores);
    if (nd < 1) {
        PyErr_SetString(PyExc_ValueError, "scores: expected an array with ndim >= 1, got ndim=0");
        return NULL;
    }
    if (!(scores = rd_in_array(o_scores, "scores", NPY_FLOAT32, nd, NULL))) return NULL;
    if (need_device() < 0) goto done;
    if (!(mask = rd_new_array(nd, PyArray_DIMS(scores), NPY_BOOL))) goto done;
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
    if (!PyArg_ParseTuple(args, "OOOOOOO:cuda_experts_forward", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6]))
        return NULL;
    if (experts_inputs(o, a, &N, &D, &E, &He) < 0 || need_device() < 0) goto done;
    if (!(y = rd_new_array(2, PyArray_DIMS(a[0]), NPY_FLOAT32))) goto done;
    rd_experts_cuda *ex = rd_experts_cuda_new();
    if (!ex) { PyErr_NoMemory(); Py_CLEAR(y); goto done; }
    rd_status st = RD_OK;
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
    if (!PyArg_ParseTuple(args, "OOOOOOOO:cuda_experts_backward", &o[7], &o[0], &o[1], &o[2], &o[3],
                          &o[4], &o[5], &o[6]))
        return NULL;
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
    rd_status st = RD_OK;
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

static void state_destructor(PyObject *cap) {
    rd_moe_cuda_state *st = (rd_moe_cuda_state *)PyCapsule_GetPointer(cap, STATE_CAPSULE);
    if (st) rd_moe_cuda_state_free(st);
}

static rd_moe_cuda_state *get_state(PyObject *cap) {
    if (!PyCapsule_IsValid(cap, STATE_CAPSULE)) {
        PyErr_Format(PyExc_TypeError, "state: expected a CUDA MoE state capsule, got %s",
                     Py_TYPE(cap)->tp_name);
        return NULL;
    }
    return (rd_moe_cuda_state *)PyCapsule_GetPointer(cap, STATE_CAPSULE);
}

static PyObject *py_moe_state(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    if (need_device() < 0) return NULL;
    rd_moe_cuda_state *st = rd_moe_cuda_state_new();
    if (!st) return PyErr_NoMemory();
    PyObject *cap = PyCapsule_New(st, STATE_CAPSULE, state_destructor);
    if (!cap) rd_moe_cuda_state_free(st);
    return cap;
}

/* cfg: a dict with D, E, He, k (int), strategy, gating (str), beta (float), eval_topk (bool). */
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
        if (parse_int(v, ints[i], dst[i]) < 0) return -1;
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
    if (parse_float(b, "beta", &beta) < 0) return -1;
    c->beta = (float)beta;
    int t = PyObject_IsTrue(et);
    if (t < 0) return -1;
    c->eval_topk = t;
    rd_status st = rd_moe_cfg_check(c);
    if (st != RD_OK) { rd_raise(st); return -1; }
    return 0;
}

static PyObject *py_moe_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_st, *o_x, *o_p, *o_cfg;
    int training;
    PyArrayObject *x = NULL, *params = NULL, *y = NULL;
    dlist L = {{0}, 0};
    rd_moe_cfg cfg;
    if (!PyArg_ParseTuple(args, "OOOOp:cuda_moe_forward", &o_st, &o_x, &o_p, &o_cfg, &training)) return NULL;
    rd_moe_cuda_state *st = get_state(o_st);
    if (!st || parse_cfg(o_cfg, &cfg) < 0) return NULL;
    int64_t sizes[RD_MOE_NPARAM];
    npy_intp np[1] = {(npy_intp)rd_moe_param_sizes(sizes, &cfg)};
    npy_intp sx[3] = {RD_ANY, RD_ANY, cfg.D};
    if (!(x = rd_in_array(o_x, "x", NPY_FLOAT32, 3, sx))) return NULL;
    if (!(params = rd_in_array(o_p, "params", NPY_FLOAT32, 1, np))) goto done;
    int64_t B = PyArray_DIM(x, 0), Ls = PyArray_DIM(x, 1);
    if (B < 1 || Ls < 1) {
        PyErr_Format(PyExc_ValueError, "x: expected B, L >= 1, got shape (%lld, %lld, %lld)",
                     (long long)B, (long long)Ls, (long long)cfg.D);
        goto done;
    }
    if (!(y = rd_new_array(3, PyArray_DIMS(x), NPY_FLOAT32))) goto done;
    rd_status s = RD_OK;
    Py_BEGIN_ALLOW_THREADS
    void *dx, *dp, *dy;
    rd_moe_params p;
    s = dl_up(&L, &dx, x);
    if (s == RD_OK) s = dl_up(&L, &dp, params);
    if (s == RD_OK) s = dl_alloc(&L, &dy, (size_t)PyArray_NBYTES(y));
    if (s == RD_OK) {
        rd_moe_params_point(&p, dp, &cfg);
        s = rd_moe_forward_cuda(st, dy, dx, &cfg, &p, B, Ls, training, NULL);
    }
    if (s == RD_OK) s = dl_down(y, dy);
    dl_free(&L);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); Py_CLEAR(y); }
done:
    Py_XDECREF(x);
    Py_XDECREF(params);
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
    rd_moe_cuda_state *st = get_state(o_st);
    if (!st || parse_cfg(o_cfg, &cfg) < 0) return NULL;
    int64_t sizes[RD_MOE_NPARAM];
    npy_intp np[1] = {(npy_intp)rd_moe_param_sizes(sizes, &cfg)};
    npy_intp sx[3] = {RD_ANY, RD_ANY, cfg.D};
    if (!(x = rd_in_array(o_x, "x", NPY_FLOAT32, 3, sx))) return NULL;
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
    Py_XDECREF(x);
    Py_XDECREF(dyin);
    Py_XDECREF(params);
    return (PyObject *)dx;
}

/* dict: mask (N,E) bool, G, R (N,E), h (N,D), counts (E,) int64, P, tau, tau_b (None when
 * unset), have_forward. */
static PyObject *py_moe_view(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_st, *d = NULL;
    PyArrayObject *arr[5] = {0};
    if (!PyArg_ParseTuple(args, "O:cuda_moe_view", &o_st)) return NULL;
    rd_moe_cuda_state *st = get_state(o_st);
    if (!st) return NULL;
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
    if (!(arr[0] = rd_new_array(2, sNE, NPY_BOOL)) || !(arr[1] = rd_new_array(2, sNE, NPY_FLOAT32)) ||
        !(arr[2] = rd_new_array(2, sNE, NPY_FLOAT32)) || !(arr[3] = rd_new_array(2, sND, NPY_FLOAT32)) ||
        !(arr[4] = rd_new_array(1, sE, NPY_INT64)))
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    s = dl_down(arr[0], v.mask);
    if (s == RD_OK) s = dl_down(arr[1], v.G);
    if (s == RD_OK) s = dl_down(arr[2], v.R);
    if (s == RD_OK) s = dl_down(arr[3], v.h);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); goto fail; }
    if (v.counts) memcpy(PyArray_DATA(arr[4]), v.counts, (size_t)v.E * sizeof(int64_t));
    const char *names[5] = {"mask", "G", "R", "h", "counts"};
    for (int i = 0; i < 5; i++) PyDict_SetItemString(d, names[i], (PyObject *)arr[i]);
    t = PyLong_FromLongLong((long long)v.P);
    PyDict_SetItemString(d, "P", t); Py_XDECREF(t);
    for (int i = 0; i < 5; i++) Py_XDECREF(arr[i]);
    return d;
fail:
    for (int i = 0; i < 5; i++) Py_XDECREF(arr[i]);
    Py_XDECREF(d);
    return NULL;
}

static PyObject *py_moe_set_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_st, *o_tau;
    if (!PyArg_ParseTuple(args, "OO:cuda_moe_set_threshold", &o_st, &o_tau)) return NULL;
    rd_moe_cuda_state *st = get_state(o_st);
    if (!st) return NULL;
    rd_status s;
    if (o_tau == Py_None) {
        s = rd_moe_set_threshold_cuda(st, NULL);
    } else {
        double tau;
        if (parse_float(o_tau, "tau", &tau) < 0) return NULL;
        float f = (float)tau;
        s = rd_moe_set_threshold_cuda(st, &f);
    }
    if (s != RD_OK) return rd_raise(s);
    Py_RETURN_NONE;
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
        if (parse_int(o, "mode", &m) < 0) return NULL;
        if (m != 0 && m != 1) {
            PyErr_Format(PyExc_ValueError, "mode: expected 0 (GEMM loop) or 1 (grouped), got %lld", (long long)m);
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
    return Py_BuildValue("{s:i,s:O,s:s,s:i}", "cublas_version", rd_cuda_cublas_version(),
                         "grouped_gemm", rd_cuda_have_grouped_gemm() ? Py_True : Py_False,
                         "runtime", rd_cuda_runtime_version(), "devices", rd_cuda_device_count());
}

static PyObject *py_bench_moe(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_x, *o_p, *o_dy, *o_cfg;
    int iters;
    PyArrayObject *x = NULL, *params = NULL, *dyin = NULL;
    PyObject *ret = NULL;
    rd_moe_cfg cfg;
    if (!PyArg_ParseTuple(args, "OOOOi:cuda_bench_moe", &o_x, &o_p, &o_dy, &o_cfg, &iters)) return NULL;
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
                          PyArray_DIM(x, 0), PyArray_DIM(x, 1), iters);
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

static PyMethodDef cuda_methods[] = {
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
    {"cuda_tf32", py_set_tf32, METH_VARARGS, "Read / set TF32 GEMMs; returns the previous value."},
    {"cuda_expert_gemm", py_set_expert_gemm, METH_VARARGS, "Read / set the expert GEMM mode."},
    {"cuda_info", py_cuda_info, METH_NOARGS, "cuBLAS version, grouped GEMM, runtime, devices."},
    {"cuda_bench_moe", py_bench_moe, METH_VARARGS, "Device-resident MoE timings (dict of ms)."},
    {NULL, NULL, 0, NULL}};

int rd_bind_cuda(PyObject *m) { return PyModule_AddFunctions(m, cuda_methods); }

#else

int rd_bind_cuda(PyObject *m) { (void)m; return 0; }

#endif
