/* bind_losses.c — Python functions of the losses area: the router-similarity and balance
 * losses (value and gradient in one call), the PLR head and its loss, and the routing
 * diagnostics. Masks and logits are (N, E) or (B, L, E); only the last axis is E. */
#include "bind.h"

#include <string.h>

#define F32 NPY_FLOAT32
#define FP(a) ((float *)PyArray_DATA(a))
#define IP(a) ((int64_t *)PyArray_DATA(a))
#define BP(a) ((const uint8_t *)PyArray_DATA(a))

/* An (N,E) or (B,L,E) array of `typenum`, held by `c`; N = product of the leading axes. */
static PyArrayObject *in_rows(rd_call *c, PyObject *obj, const char *name, int typenum,
                              int64_t *N, int64_t *E) {
    *N = *E = 0;
    if (!PyArray_Check(obj)) return rd_in_array(obj, name, typenum, 2, NULL); /* the TypeError */
    int nd = PyArray_NDIM((PyArrayObject *)obj);
    if (nd != 2 && nd != 3) {
        PyErr_Format(PyExc_ValueError, "%s: expected an (N, E) or (B, L, E) array, got ndim=%d",
                     name, nd);
        return NULL;
    }
    PyArrayObject *a = rd_call_in(c, obj, name, typenum, nd, NULL);
    if (!a) return NULL;
    *E = PyArray_DIM(a, nd - 1);
    *N = PyArray_SIZE(a) / (*E > 0 ? *E : 1);
    if (*E == 0) *N = nd == 2 ? PyArray_DIM(a, 0) : PyArray_DIM(a, 0) * PyArray_DIM(a, 1);
    return a;
}

/* R and mask of the same shape, both (N,E) or (B,L,E). */
static int in_logits_mask(rd_call *c, PyObject *o_R, PyObject *o_mask, PyArrayObject **R,
                          PyArrayObject **mask, int64_t *N, int64_t *E) {
    int64_t n2, e2;
    if (!(*R = in_rows(c, o_R, "R", F32, N, E))) return -1;
    if (!(*mask = in_rows(c, o_mask, "mask", NPY_BOOL, &n2, &e2))) return -1;
    if (PyArray_NDIM(*R) != PyArray_NDIM(*mask) ||
        !PyArray_CompareLists(PyArray_DIMS(*R), PyArray_DIMS(*mask), PyArray_NDIM(*R))) {
        char a[160], b[160];
        rd_shape_str(a, sizeof a, PyArray_NDIM(*R), PyArray_DIMS(*R));
        rd_shape_str(b, sizeof b, PyArray_NDIM(*mask), PyArray_DIMS(*mask));
        PyErr_Format(PyExc_ValueError, "mask: expected the shape of R %s, got %s", a, b);
        return -1;
    }
    return 0;
}

typedef rd_status (*loss_fwd_fn)(float *, float *, float *, const float *, const uint8_t *,
                                 int64_t, int64_t);
typedef rd_status (*loss_bwd_fn)(float *, float, const float *, const float *, int64_t, int64_t);

/* The forward, then (when it succeeded) the backward with upstream gradient 1. */
static rd_status loss_and_grad(loss_fwd_fn fwd, loss_bwd_fn bwd, float *loss, PyArrayObject *dR,
                               PyArrayObject *P, PyArrayObject *X, PyArrayObject *R,
                               PyArrayObject *mask, int64_t N, int64_t E) {
    rd_status st = fwd(loss, FP(P), FP(X), FP(R), BP(mask), N, E);
    return st ? st : bwd(FP(dR), 1.0f, FP(P), FP(X), N, E);
}

/* Value and gradient of a router loss whose saved state is P (N,E) and one extra
 * buffer of `extra` floats (W for similarity, f for balance). */
static PyObject *router_loss(PyObject *args, const char *fmt, loss_fwd_fn fwd, loss_bwd_fn bwd,
                             int extra_is_square) {
    PyObject *o_R, *o_mask, *ret = NULL;
    PyArrayObject *R, *mask, *dR, *P, *X;
    rd_call c = {0};
    int64_t N, E;
    float loss = 0.0f;
    if (!PyArg_ParseTuple(args, fmt, &o_R, &o_mask)) return NULL;
    if (in_logits_mask(&c, o_R, o_mask, &R, &mask, &N, &E) < 0) goto done;
    if (!(dR = rd_call_new(&c, PyArray_NDIM(R), PyArray_DIMS(R), F32))) goto done;
    RD_NEW(c, P, F32, 2, N, E);
    if (extra_is_square) RD_NEW(c, X, F32, 2, E, E);
    else RD_NEW(c, X, F32, 1, E);
    RD_RUN(loss_and_grad(fwd, bwd, &loss, dR, P, X, R, mask, N, E));
    ret = Py_BuildValue("dO", (double)loss, (PyObject *)dR);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_router_similarity_loss(PyObject *self, PyObject *args) {
    (void)self;
    return router_loss(args, "OO:router_similarity_loss", rd_router_similarity_forward,
                       rd_router_similarity_backward, 1);
}

static PyObject *py_balance_loss(PyObject *self, PyObject *args) {
    (void)self;
    return router_loss(args, "OO:balance_loss", rd_balance_forward, rd_balance_backward, 0);
}

/* ---- PLR head ----------------------------------------------------------------- */

/* h (N,D) and wt (D,Pd) with D, Pd >= 1, held by `c`. */
static int in_head(rd_call *c, PyObject *o_h, PyObject *o_wt, PyArrayObject **h,
                   PyArrayObject **wt, int64_t *N, int64_t *D, int64_t *Pd) {
    if (!(*h = rd_call_in(c, o_h, "h", F32, 2, NULL))) return -1;
    *N = PyArray_DIM(*h, 0);
    *D = PyArray_DIM(*h, 1);
    npy_intp wshape[2] = {(npy_intp)*D, RD_ANY};
    if (!(*wt = rd_call_in(c, o_wt, "wt", F32, 2, wshape))) return -1;
    *Pd = PyArray_DIM(*wt, 1);
    if (*D >= 1 && *Pd >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "wt: expected a (D, plr_dim) array with D, plr_dim >= 1, got (%lld, %lld)",
                 (long long)*D, (long long)*Pd);
    return -1;
}

static PyObject *py_plr_head_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_h, *o_wt, *o_bt, *ret = NULL;
    PyArrayObject *h, *wt, *bt, *T;
    rd_call c = {0};
    int64_t N, D, Pd;
    if (!PyArg_ParseTuple(args, "OOO:plr_head_forward", &o_h, &o_wt, &o_bt)) return NULL;
    if (in_head(&c, o_h, o_wt, &h, &wt, &N, &D, &Pd) < 0) goto done;
    RD_IN(c, bt, o_bt, "bt", F32, 1, Pd);
    RD_NEW(c, T, F32, 2, N, Pd);
    RD_RUN(rd_plr_forward(FP(T), FP(h), FP(wt), FP(bt), N, D, Pd));
    ret = Py_NewRef((PyObject *)T);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_plr_head_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_dT, *o_h, *o_wt, *ret = NULL;
    PyArrayObject *dT, *h, *wt, *dh, *dwt, *dbt;
    rd_call c = {0};
    int64_t N, D, Pd;
    if (!PyArg_ParseTuple(args, "OOO:plr_head_backward", &o_dT, &o_h, &o_wt)) return NULL;
    if (in_head(&c, o_h, o_wt, &h, &wt, &N, &D, &Pd) < 0) goto done;
    RD_IN(c, dT, o_dT, "dT", F32, 2, N, Pd);
    RD_NEW(c, dh, F32, 2, N, D);
    RD_NEW(c, dwt, F32, 2, D, Pd);
    RD_NEW(c, dbt, F32, 1, Pd);
    RD_RUN(rd_plr_backward(FP(dh), FP(dwt), FP(dbt), FP(dT), FP(h), FP(wt), N, D, Pd));
    ret = Py_BuildValue("OOO", (PyObject *)dh, (PyObject *)dwt, (PyObject *)dbt);
done:
    rd_call_end(&c);
    return ret;
}

static rd_status plr_loss_and_grad(float *loss, float *dT, const float *T, const float *target,
                                   int64_t n) {
    rd_status st = rd_plr_loss_forward(loss, T, target, n);
    return st ? st : rd_plr_loss_backward(dT, 1.0f, T, target, n);
}

static PyObject *py_plr_loss(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_T, *o_target, *ret = NULL;
    PyArrayObject *T, *target, *dT;
    rd_call c = {0};
    float loss = 0.0f;
    if (!PyArg_ParseTuple(args, "OO:plr_loss", &o_T, &o_target)) return NULL;
    if (!PyArray_Check(o_T)) return (PyObject *)rd_in_array(o_T, "T", F32, 2, NULL);
    int nd = PyArray_NDIM((PyArrayObject *)o_T);
    if (nd < 1) {
        PyErr_SetString(PyExc_ValueError, "T: expected an array with ndim >= 1, got ndim=0");
        return NULL;
    }
    if (!(T = rd_call_in(&c, o_T, "T", F32, nd, NULL)) ||
        !(target = rd_call_in(&c, o_target, "target", F32, nd, PyArray_DIMS(T))) ||
        !(dT = rd_call_new(&c, nd, PyArray_DIMS(T), F32)))
        goto done;
    RD_RUN(plr_loss_and_grad(&loss, FP(dT), FP(T), FP(target), PyArray_SIZE(T)));
    ret = Py_BuildValue("dO", (double)loss, (PyObject *)dT);
done:
    rd_call_end(&c);
    return ret;
}

/* ---- diagnostics -------------------------------------------------------------- */

/* The per-expert load (E,) of a mask argument, as a new int64 array. */
static PyArrayObject *mask_load(PyObject *o_mask, int64_t *E) {
    int64_t N;
    PyArrayObject *mask, *load = NULL;
    rd_call c = {0};
    if (!(mask = in_rows(&c, o_mask, "mask", NPY_BOOL, &N, E))) goto done;
    if (!(load = rd_new_array(1, (npy_intp[]){(npy_intp)*E}, NPY_INT64))) goto done;
    Py_BEGIN_ALLOW_THREADS
    rd_expert_load(IP(load), BP(mask), N, *E);
    Py_END_ALLOW_THREADS
done:
    rd_call_end(&c);
    return load;
}

static PyObject *py_expert_load(PyObject *self, PyObject *o_mask) {
    (void)self;
    int64_t E;
    return (PyObject *)mask_load(o_mask, &E);
}

static PyObject *py_dead_experts(PyObject *self, PyObject *o_mask) {
    (void)self;
    int64_t E, dead = 0;
    PyArrayObject *load = mask_load(o_mask, &E);
    if (!load) return NULL;
    rd_status st = rd_dead_experts(&dead, (const int64_t *)PyArray_DATA(load), E);
    Py_DECREF(load);
    if (st != RD_OK) return rd_raise(st);
    return PyLong_FromLongLong((long long)dead);
}

static PyObject *py_max_violation(PyObject *self, PyObject *o_mask) {
    (void)self;
    int64_t E;
    double v = 0.0;
    PyArrayObject *load = mask_load(o_mask, &E);
    if (!load) return NULL;
    rd_status st = E < 1 ? rd_fail(RD_EINVAL, "mask: expected E >= 1 experts, got E=0")
                         : rd_max_violation(&v, (const int64_t *)PyArray_DATA(load), E);
    Py_DECREF(load);
    if (st != RD_OK) return rd_raise(st);
    return PyFloat_FromDouble(v);
}

static PyObject *py_coselect_counts(PyObject *self, PyObject *o_mask) {
    (void)self;
    int64_t N, E;
    PyObject *ret = NULL;
    PyArrayObject *mask, *C;
    rd_call c = {0};
    if (!(mask = in_rows(&c, o_mask, "mask", NPY_BOOL, &N, &E))) goto done;
    RD_NEW(c, C, NPY_INT64, 2, E, E);
    RD_RUN(rd_coselect_counts(IP(C), BP(mask), N, E));
    ret = Py_NewRef((PyObject *)C);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_combination_usage(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_mask, *o_cov;
    double cov, v = 0.0;
    if (!PyArg_ParseTuple(args, "OO:combination_usage", &o_mask, &o_cov)) return NULL;
    if (rd_parse_real(o_cov, "coverage", &cov) < 0) return NULL;
    if (!(cov > 0.0 && cov <= 1.0)) {
        PyErr_Format(PyExc_ValueError, "coverage: expected a value in (0, 1], got %R", o_cov);
        return NULL;
    }
    PyArrayObject *C = (PyArrayObject *)py_coselect_counts(NULL, o_mask);
    if (!C) return NULL;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_combination_usage(&v, (const int64_t *)PyArray_DATA(C), PyArray_DIM(C, 0), cov);
    Py_END_ALLOW_THREADS
    Py_DECREF(C);
    if (st != RD_OK) return rd_raise(st);
    return PyFloat_FromDouble(v);
}

static PyObject *py_allocation_by_key(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_mask, *o_keys, *o_nb, *ret = NULL;
    PyArrayObject *mask, *keys, *mean, *count;
    rd_call c = {0};
    int64_t NB;
    if (!PyArg_ParseTuple(args, "OOO:allocation_by_key", &o_mask, &o_keys, &o_nb)) return NULL;
    if (rd_parse_int(o_nb, "num_buckets", &NB) < 0) return NULL;
    if (NB < 1) {
        PyErr_Format(PyExc_ValueError, "num_buckets: expected an int >= 1, got %lld", (long long)NB);
        return NULL;
    }
    RD_IN(c, mask, o_mask, "mask", NPY_BOOL, 3, RD_ANY, RD_ANY, RD_ANY);
    int64_t B = PyArray_DIM(mask, 0), L = PyArray_DIM(mask, 1), E = PyArray_DIM(mask, 2);
    RD_IN(c, keys, o_keys, "keys", NPY_INT64, 1, B);
    RD_NEW(c, mean, NPY_FLOAT64, 1, NB);
    RD_NEW(c, count, NPY_INT64, 1, NB);
    RD_RUN(rd_allocation_by_key((double *)PyArray_DATA(mean), IP(count), BP(mask), IP(keys), B,
                                L, E, NB));
    ret = Py_BuildValue("OO", (PyObject *)mean, (PyObject *)count);
done:
    rd_call_end(&c);
    return ret;
}

static PyMethodDef losses_methods[] = {
    {"router_similarity_loss", py_router_similarity_loss, METH_VARARGS,
     "router_similarity_loss(R, mask) -> (loss, dR)"},
    {"balance_loss", py_balance_loss, METH_VARARGS, "balance_loss(R, mask) -> (loss, dR)"},
    {"plr_head_forward", py_plr_head_forward, METH_VARARGS, "plr_head_forward(h, wt, bt) -> T"},
    {"plr_head_backward", py_plr_head_backward, METH_VARARGS,
     "plr_head_backward(dT, h, wt) -> (dh, dwt, dbt)"},
    {"plr_loss", py_plr_loss, METH_VARARGS, "plr_loss(T, target) -> (loss, dT)"},
    {"expert_load", py_expert_load, METH_O, "expert_load(mask) -> int64 (E,)"},
    {"dead_experts", py_dead_experts, METH_O, "dead_experts(mask) -> int"},
    {"max_violation", py_max_violation, METH_O, "max_violation(mask) -> float"},
    {"coselect_counts", py_coselect_counts, METH_O, "coselect_counts(mask) -> int64 (E, E)"},
    {"combination_usage", py_combination_usage, METH_VARARGS,
     "combination_usage(mask, coverage) -> float"},
    {"allocation_by_key", py_allocation_by_key, METH_VARARGS,
     "allocation_by_key(mask, keys, num_buckets) -> (mean, count)"},
    {NULL, NULL, 0, NULL}};

int rd_bind_losses(PyObject *m) { return PyModule_AddFunctions(m, losses_methods); }
