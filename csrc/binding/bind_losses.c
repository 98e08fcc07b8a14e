/* bind_losses.c — Python functions of the losses area: the router-similarity and balance
 * losses (value and gradient in one call), the PLR head and its loss, and the routing
 * diagnostics. Masks and logits are (N, E) or (B, L, E); only the last axis is E. */
#include "bind.h"

#include <string.h>

/* An (N,E) or (B,L,E) array of `typenum`; N = product of the leading axes. */
static PyArrayObject *in_rows(PyObject *obj, const char *name, int typenum, int64_t *N,
                              int64_t *E) {
    *N = *E = 0;
    if (PyArray_Check(obj)) {
        int nd = PyArray_NDIM((PyArrayObject *)obj);
        if (nd != 2 && nd != 3) {
            PyErr_Format(PyExc_ValueError, "%s: expected an (N, E) or (B, L, E) array, got ndim=%d",
                         name, nd);
            return NULL;
        }
        PyArrayObject *a = rd_in_array(obj, name, typenum, nd, NULL);
        if (!a) return NULL;
        *E = PyArray_DIM(a, nd - 1);
        *N = PyArray_SIZE(a) / (*E > 0 ? *E : 1);
        if (*E == 0) *N = nd == 2 ? PyArray_DIM(a, 0) : PyArray_DIM(a, 0) * PyArray_DIM(a, 1);
        return a;
    }
    return rd_in_array(obj, name, typenum, 2, NULL);   /* raises the TypeError */
}

/* R and mask of the same shape, both (N,E) or (B,L,E). */
static int in_logits_mask(PyObject *o_R, PyObject *o_mask, PyArrayObject **R,
                          PyArrayObject **mask, int64_t *N, int64_t *E) {
    int64_t n2, e2;
    *R = in_rows(o_R, "R", NPY_FLOAT32, N, E);
    if (!*R) return -1;
    *mask = in_rows(o_mask, "mask", NPY_BOOL, &n2, &e2);
    if (!*mask) return -1;
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

/* Value and gradient of a router loss whose saved state is P (N,E) and one extra
 * buffer of `extra` floats (W for similarity, f for balance). */
static PyObject *router_loss(PyObject *args, const char *fmt, loss_fwd_fn fwd, loss_bwd_fn bwd,
                             int extra_is_square) {
    PyObject *o_R, *o_mask, *ret = NULL;
    PyArrayObject *R = NULL, *mask = NULL, *dR = NULL, *P = NULL, *X = NULL;
    int64_t N, E;
    if (!PyArg_ParseTuple(args, fmt, &o_R, &o_mask)) return NULL;
    if (in_logits_mask(o_R, o_mask, &R, &mask, &N, &E) < 0) goto fail;
    npy_intp ne[2] = {(npy_intp)N, (npy_intp)E}, xe[2] = {(npy_intp)E, (npy_intp)E};
    dR = rd_new_array(PyArray_NDIM(R), PyArray_DIMS(R), NPY_FLOAT32);
    P = rd_new_array(2, ne, NPY_FLOAT32);
    X = rd_new_array(extra_is_square ? 2 : 1, xe, NPY_FLOAT32);
    if (!dR || !P || !X) goto fail;
    float loss = 0.0f;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = fwd(&loss, (float *)PyArray_DATA(P), (float *)PyArray_DATA(X),
             (const float *)PyArray_DATA(R), (const uint8_t *)PyArray_DATA(mask), N, E);
    if (st == RD_OK)
        st = bwd((float *)PyArray_DATA(dR), 1.0f, (const float *)PyArray_DATA(P),
                 (const float *)PyArray_DATA(X), N, E);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto fail; }
    ret = Py_BuildValue("dO", (double)loss, (PyObject *)dR);
fail:
    Py_XDECREF(R);
    Py_XDECREF(mask);
    Py_XDECREF(dR);
    Py_XDECREF(P);
    Py_XDECREF(X);
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

/* h (N,D) and wt (D,Pd) with D, Pd >= 1; on failure both are released. */
static int in_head(PyObject *o_h, PyObject *o_wt, PyArrayObject **h, PyArrayObject **wt,
                   int64_t *N, int64_t *D, int64_t *Pd) {
    *wt = NULL;
    if (!(*h = rd_in_array(o_h, "h", NPY_FLOAT32, 2, NULL))) return -1;
    *N = PyArray_DIM(*h, 0);
    *D = PyArray_DIM(*h, 1);
    npy_intp wshape[2] = {(npy_intp)*D, RD_ANY};
    if (!(*wt = rd_in_array(o_wt, "wt", NPY_FLOAT32, 2, wshape))) goto fail;
    *Pd = PyArray_DIM(*wt, 1);
    if (*D >= 1 && *Pd >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "wt: expected a (D, plr_dim) array with D, plr_dim >= 1, got (%lld, %lld)",
                 (long long)*D, (long long)*Pd);
fail:
    Py_CLEAR(*h);
    Py_CLEAR(*wt);
    return -1;
}

static PyObject *py_plr_head_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_h, *o_wt, *o_bt;
    PyArrayObject *h = NULL, *wt = NULL, *bt = NULL, *T = NULL;
    int64_t N, D, Pd;
    if (!PyArg_ParseTuple(args, "OOO:plr_head_forward", &o_h, &o_wt, &o_bt)) return NULL;
    if (in_head(o_h, o_wt, &h, &wt, &N, &D, &Pd) < 0) return NULL;
    npy_intp bshape[1] = {(npy_intp)Pd};
    bt = rd_in_array(o_bt, "bt", NPY_FLOAT32, 1, bshape);
    if (!bt) goto fail;
    npy_intp tshape[2] = {(npy_intp)N, (npy_intp)Pd};
    T = rd_new_array(2, tshape, NPY_FLOAT32);
    if (!T) goto fail;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_plr_forward((float *)PyArray_DATA(T), (const float *)PyArray_DATA(h),
                        (const float *)PyArray_DATA(wt), (const float *)PyArray_DATA(bt), N, D, Pd);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); Py_CLEAR(T); }
fail:
    Py_XDECREF(h);
    Py_XDECREF(wt);
    Py_XDECREF(bt);
    return (PyObject *)T;
}

static PyObject *py_plr_head_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_dT, *o_h, *o_wt, *ret = NULL;
    PyArrayObject *dT = NULL, *h = NULL, *wt = NULL, *dh = NULL, *dwt = NULL, *dbt = NULL;
    int64_t N, D, Pd;
    if (!PyArg_ParseTuple(args, "OOO:plr_head_backward", &o_dT, &o_h, &o_wt)) return NULL;
    if (in_head(o_h, o_wt, &h, &wt, &N, &D, &Pd) < 0) return NULL;
    npy_intp tshape[2] = {(npy_intp)N, (npy_intp)Pd};
    dT = rd_in_array(o_dT, "dT", NPY_FLOAT32, 2, tshape);
    if (!dT) goto fail;
    npy_intp pshape[1] = {(npy_intp)Pd};
    dh = rd_new_array(2, PyArray_DIMS(h), NPY_FLOAT32);
    dwt = rd_new_array(2, PyArray_DIMS(wt), NPY_FLOAT32);
    dbt = rd_new_array(1, pshape, NPY_FLOAT32);
    if (!dh || !dwt || !dbt) goto fail;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_plr_backward((float *)PyArray_DATA(dh), (float *)PyArray_DATA(dwt),
                         (float *)PyArray_DATA(dbt), (const float *)PyArray_DATA(dT),
                         (const float *)PyArray_DATA(h), (const float *)PyArray_DATA(wt), N, D, Pd);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto fail; }
    ret = Py_BuildValue("OOO", (PyObject *)dh, (PyObject *)dwt, (PyObject *)dbt);
fail:
    Py_XDECREF(dT);
    Py_XDECREF(h);
    Py_XDECREF(wt);
    Py_XDECREF(dh);
    Py_XDECREF(dwt);
    Py_XDECREF(dbt);
    return ret;
}

static PyObject *py_plr_loss(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_T, *o_target, *ret = NULL;
    PyArrayObject *T = NULL, *target = NULL, *dT = NULL;
    if (!PyArg_ParseTuple(args, "OO:plr_loss", &o_T, &o_target)) return NULL;
    if (!PyArray_Check(o_T)) { T = rd_in_array(o_T, "T", NPY_FLOAT32, 2, NULL); goto fail; }
    int nd = PyArray_NDIM((PyArrayObject *)o_T);
    if (nd < 1) {
        PyErr_SetString(PyExc_ValueError, "T: expected an array with ndim >= 1, got ndim=0");
        goto fail;
    }
    T = rd_in_array(o_T, "T", NPY_FLOAT32, nd, NULL);
    if (!T) goto fail;
    target = rd_in_array(o_target, "target", NPY_FLOAT32, nd, PyArray_DIMS(T));
    if (!target) goto fail;
    int64_t n = PyArray_SIZE(T);
    dT = rd_new_array(nd, PyArray_DIMS(T), NPY_FLOAT32);
    if (!dT) goto fail;
    float loss = 0.0f;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_plr_loss_forward(&loss, (const float *)PyArray_DATA(T),
                             (const float *)PyArray_DATA(target), n);
    if (st == RD_OK)
        st = rd_plr_loss_backward((float *)PyArray_DATA(dT), 1.0f, (const float *)PyArray_DATA(T),
                                  (const float *)PyArray_DATA(target), n);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto fail; }
    ret = Py_BuildValue("dO", (double)loss, (PyObject *)dT);
fail:
    Py_XDECREF(T);
    Py_XDECREF(target);
    Py_XDECREF(dT);
    return ret;
}

/* ---- diagnostics -------------------------------------------------------------- */

/* The per-expert load (E,) of a mask argument, as a new int64 array. */
static PyArrayObject *mask_load(PyObject *o_mask, int64_t *E_out) {
    int64_t N, E;
    PyArrayObject *mask = in_rows(o_mask, "mask", NPY_BOOL, &N, &E);
    if (!mask) return NULL;
    npy_intp eshape[1] = {(npy_intp)E};
    PyArrayObject *load = rd_new_array(1, eshape, NPY_INT64);
    if (load) {
        Py_BEGIN_ALLOW_THREADS
        rd_expert_load((int64_t *)PyArray_DATA(load), (const uint8_t *)PyArray_DATA(mask), N, E);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(mask);
    *E_out = E;
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
    PyArrayObject *mask = in_rows(o_mask, "mask", NPY_BOOL, &N, &E);
    if (!mask) return NULL;
    npy_intp cshape[2] = {(npy_intp)E, (npy_intp)E};
    PyArrayObject *C = rd_new_array(2, cshape, NPY_INT64);
    rd_status st = RD_OK;
    if (C) {
        Py_BEGIN_ALLOW_THREADS
        st = rd_coselect_counts((int64_t *)PyArray_DATA(C), (const uint8_t *)PyArray_DATA(mask), N, E);
        Py_END_ALLOW_THREADS
        if (st != RD_OK) { rd_raise(st); Py_CLEAR(C); }
    }
    Py_DECREF(mask);
    return (PyObject *)C;
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
    PyArrayObject *mask = NULL, *keys = NULL, *mean = NULL, *count = NULL;
    int64_t NB;
    if (!PyArg_ParseTuple(args, "OOO:allocation_by_key", &o_mask, &o_keys, &o_nb)) return NULL;
    if (rd_parse_int(o_nb, "num_buckets", &NB) < 0) return NULL;
    if (NB < 1) {
        PyErr_Format(PyExc_ValueError, "num_buckets: expected an int >= 1, got %lld", (long long)NB);
        return NULL;
    }
    mask = rd_in_array(o_mask, "mask", NPY_BOOL, 3, NULL);
    if (!mask) goto fail;
    int64_t B = PyArray_DIM(mask, 0), L = PyArray_DIM(mask, 1), E = PyArray_DIM(mask, 2);
    npy_intp kshape[1] = {(npy_intp)B}, bshape[1] = {(npy_intp)NB};
    keys = rd_in_array(o_keys, "keys", NPY_INT64, 1, kshape);
    if (!keys) goto fail;
    mean = rd_new_array(1, bshape, NPY_FLOAT64);
    count = rd_new_array(1, bshape, NPY_INT64);
    if (!mean || !count) goto fail;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_allocation_by_key((double *)PyArray_DATA(mean), (int64_t *)PyArray_DATA(count),
                              (const uint8_t *)PyArray_DATA(mask), (const int64_t *)PyArray_DATA(keys),
                              B, L, E, NB);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto fail; }
    ret = Py_BuildValue("OO", (PyObject *)mean, (PyObject *)count);
fail:
    Py_XDECREF(mask);
    Py_XDECREF(keys);
    Py_XDECREF(mean);
    Py_XDECREF(count);
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
