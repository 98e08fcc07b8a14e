/* bind.c — argument validation and error translation shared by every binding file. */
#include "bind.h"

#include <string.h>

int rd_try_take(rd_busy *flag) { return atomic_exchange(flag, 1) == 0; }

int rd_take(rd_busy *flag, const char *what) {
    if (rd_try_take(flag)) return 0;
    PyErr_Format(PyExc_RuntimeError, "%s: in use by another thread", what);
    return -1;
}

void rd_give(rd_busy *flag) { atomic_store(flag, 0); }

void *rd_capsule_ptr(PyObject *cap, const char *name, const char *arg, const char *what) {
    if (PyCapsule_IsValid(cap, name)) return PyCapsule_GetPointer(cap, name);
    PyErr_Format(PyExc_TypeError, "%s: expected %s, got %s", arg, what, Py_TYPE(cap)->tp_name);
    return NULL;
}

void rd_shape_str(char *buf, size_t n, int ndim, const npy_intp *shape) {
    size_t used = 0;
    used += (size_t)snprintf(buf + used, n - used, "(");
    for (int i = 0; i < ndim && used < n; i++) {
        if (shape[i] == RD_ANY)
            used += (size_t)snprintf(buf + used, n - used, "%s*", i ? ", " : "");
        else
            used += (size_t)snprintf(buf + used, n - used, "%s%lld", i ? ", " : "",
                                     (long long)shape[i]);
    }
    if (used < n) snprintf(buf + used, n - used, ndim == 1 ? ",)" : ")");
}

static int check_shape(PyArrayObject *a, const char *name, int ndim, const npy_intp *shape) {
    char exp[160], got[160];
    if (PyArray_NDIM(a) != ndim) {
        rd_shape_str(got, sizeof got, PyArray_NDIM(a), PyArray_DIMS(a));
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-d array, got ndim=%d with shape %s",
                     name, ndim, PyArray_NDIM(a), got);
        return -1;
    }
    if (!shape) return 0;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] != RD_ANY && shape[i] != PyArray_DIM(a, i)) {
            rd_shape_str(exp, sizeof exp, ndim, shape);
            rd_shape_str(got, sizeof got, ndim, PyArray_DIMS(a));
            PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got %s", name, exp, got);
            return -1;
        }
    }
    return 0;
}

static const char *type_name(int typenum) {
    PyArray_Descr *d = PyArray_DescrFromType(typenum);
    const char *s = d ? d->typeobj->tp_name : "?";
    Py_XDECREF(d);
    return s;
}

PyArrayObject *rd_in_array(PyObject *obj, const char *name, int typenum, int ndim,
                           const npy_intp *shape) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype %s, got %s",
                     name, type_name(typenum), Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    int t = PyArray_TYPE(a);
    int ok = t == typenum ||
             (typenum == NPY_FLOAT32 && (t == NPY_FLOAT64 || t == NPY_FLOAT16)) ||
             (typenum == NPY_INT64 && (t == NPY_INT32 || t == NPY_INT16 || t == NPY_INT8 ||
                                       t == NPY_UINT8 || t == NPY_UINT16 || t == NPY_UINT32));
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s", name,
                     type_name(typenum), PyArray_DESCR(a)->typeobj->tp_name);
        return NULL;
    }
    if (check_shape(a, name, ndim, shape) < 0) return NULL;
    return (PyArrayObject *)PyArray_FromAny(obj, PyArray_DescrFromType(typenum), 0, 0,
                                            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                NPY_ARRAY_FORCECAST,
                                            NULL);
}

PyArrayObject *rd_out_array(PyObject *obj, const char *name, int typenum, int ndim,
                            const npy_intp *shape) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype %s, got %s",
                     name, type_name(typenum), Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %s (not converted: it is written to)",
                     name, type_name(typenum), PyArray_DESCR(a)->typeobj->tp_name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISWRITEABLE(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous, aligned, writeable array", name);
        return NULL;
    }
    if (check_shape(a, name, ndim, shape) < 0) return NULL;
    return a;
}

PyArrayObject *rd_new_array(int ndim, const npy_intp *shape, int typenum) {
    return (PyArrayObject *)PyArray_ZEROS(ndim, (npy_intp *)shape, typenum, 0);
}

PyObject *rd_raise(rd_status s) {
    const char *msg = rd_last_error();
    if (!msg || !*msg) msg = "racedit: unknown error";
    switch (s) {
    case RD_EINVAL: PyErr_SetString(PyExc_ValueError, msg); break;
    case RD_ENOMEM: PyErr_SetString(PyExc_MemoryError, msg); break;
    default: PyErr_SetString(PyExc_RuntimeError, msg); break;
    }
    return NULL;
}

PyObject *rd_f64_result(int64_t rows, int64_t cols, rd_status (*fill)(void *ctx, double *out),
                        void *ctx) {
    npy_intp sh[2] = {(npy_intp)rows, (npy_intp)cols};
    PyArrayObject *out = rd_new_array(2, sh, NPY_FLOAT64);
    if (!out) return NULL;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = fill(ctx, (double *)PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    if (s != RD_OK) {
        Py_DECREF(out);
        return rd_raise(s);
    }
    return (PyObject *)out;
}

/* The lowest and one past the highest byte an array's elements occupy. */
static void byte_extent(PyArrayObject *a, const char **lo, const char **hi) {
    npy_intp below = 0, above = PyArray_ITEMSIZE(a);
    for (int i = 0; i < PyArray_NDIM(a); i++) {
        npy_intp span = (PyArray_DIM(a, i) - 1) * PyArray_STRIDE(a, i);
        if (span < 0) below += span;
        else above += span;
    }
    *lo = PyArray_BYTES(a) + below;
    *hi = PyArray_BYTES(a) + above;
}

int rd_check_disjoint(PyArrayObject *out, const char *out_name, PyArrayObject *const *in, int n,
                      const char *const *names) {
    if (PyArray_SIZE(out) == 0) return 0;
    const char *lo, *hi, *ilo, *ihi;
    byte_extent(out, &lo, &hi);
    for (int i = 0; i < n; i++) {
        if (!in[i] || PyArray_SIZE(in[i]) == 0) continue;
        byte_extent(in[i], &ilo, &ihi);
        if (ilo < hi && lo < ihi) {
            PyErr_Format(PyExc_ValueError, "%s: must not be the %s buffer nor overlap it (it is "
                         "written while %s is read)", out_name, names[i], names[i]);
            return -1;
        }
    }
    return 0;
}

const char *rd_str_text(PyObject *obj) {
    Py_ssize_t n;
    const char *s = PyUnicode_Check(obj) ? PyUnicode_AsUTF8AndSize(obj, &n) : NULL;
    return s && strlen(s) == (size_t)n ? s : NULL;
}

static int parse_name(PyObject *obj, const char *argname, const char *const *names, int n,
                      int *out) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a str, got %s", argname, Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *s = rd_str_text(obj);
    if (!s && PyErr_Occurred()) return -1;
    for (int i = 0; s && i < n; i++)
        if (strcmp(s, names[i]) == 0) { *out = i; return 0; }
    char opts[256] = "";
    for (int i = 0; i < n; i++) {
        strncat(opts, i ? ", " : "", sizeof opts - strlen(opts) - 1);
        strncat(opts, names[i], sizeof opts - strlen(opts) - 1);
    }
    PyErr_Format(PyExc_ValueError, "%s: expected one of %s, got %R", argname, opts, obj);
    return -1;
}

int rd_parse_strategy(PyObject *obj, const char *argname, rd_strategy *out) {
    const char *names[RD_NUM_STRATEGIES];
    for (int i = 0; i < RD_NUM_STRATEGIES; i++) names[i] = rd_strategy_name((rd_strategy)i);
    int v;
    if (parse_name(obj, argname, names, RD_NUM_STRATEGIES, &v) < 0) return -1;
    *out = (rd_strategy)v;
    return 0;
}

int rd_parse_gating(PyObject *obj, const char *argname, rd_gating *out) {
    const char *names[3];
    for (int i = 0; i < 3; i++) names[i] = rd_gating_name((rd_gating)i);
    int v;
    if (parse_name(obj, argname, names, 3, &v) < 0) return -1;
    *out = (rd_gating)v;
    return 0;
}

int rd_parse_int(PyObject *obj, const char *name, int64_t *out) {
    if (PyBool_Check(obj) || PyArray_IsScalar(obj, Bool) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyObject *idx = PyNumber_Index(obj);
    if (!idx) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s: %R does not fit in a 64-bit integer", name, obj);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

int rd_parse_real(PyObject *obj, const char *name, double *out) {
    if (PyBool_Check(obj) || PyArray_IsScalar(obj, Bool) ||
        !(PyFloat_Check(obj) || PyLong_Check(obj) || PyArray_IsScalar(obj, Number))) {
        PyErr_Format(PyExc_TypeError, "%s: expected a real number, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

int rd_check_route_args(int64_t B, int64_t L, int64_t E, int64_t k) {
    if (B < 1 || L < 1 || E < 1) {
        PyErr_Format(PyExc_ValueError,
                     "scores: expected a non-empty (B, L, E) array, got shape (%lld, %lld, %lld)",
                     (long long)B, (long long)L, (long long)E);
        return -1;
    }
    if (k < 0 || k > E) {
        PyErr_Format(PyExc_ValueError, "k: expected 0 <= k <= E = %lld, got %lld", (long long)E,
                     (long long)k);
        return -1;
    }
    return 0;
}

int rd_threshold_args(PyObject *o_scores, PyObject *o_tau, PyArrayObject **scores, double *tau) {
    *scores = NULL;
    if (rd_parse_real(o_tau, "tau", tau) < 0) return -1;
    if (*tau != *tau) {
        PyErr_SetString(PyExc_ValueError, "tau: expected a number, got NaN");
        return -1;
    }
    if (!PyArray_Check(o_scores)) {
        PyErr_Format(PyExc_TypeError, "scores: expected a numpy.ndarray of dtype float32, got %s",
                     Py_TYPE(o_scores)->tp_name);
        return -1;
    }
    int nd = PyArray_NDIM((PyArrayObject *)o_scores);
    if (nd < 1) {
        PyErr_SetString(PyExc_ValueError, "scores: expected an array with ndim >= 1, got ndim=0");
        return -1;
    }
    *scores = rd_in_array(o_scores, "scores", NPY_FLOAT32, nd, NULL);
    return *scores ? 0 : -1;
}
