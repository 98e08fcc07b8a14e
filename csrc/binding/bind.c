/* bind.c — argument validation and error translation shared by every binding file. */
#include "bind.h"

#include <math.h>
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

int rd_parse_precision(PyObject *obj, const char *name, int *out) {
    static const char *const names[3] = {"fp32", "tf32", "bf16"};
    *out = RD_PREC_FP32;
    return obj && obj != Py_None ? parse_name(obj, name, names, 3, out) : 0;
}

/* ---- devices ------------------------------------------------------------------------ */

int rd_parse_device(PyObject *obj, const rd_backend **out) {
    *out = &rd_backend_cpu;
    if (!obj || obj == Py_None) return 0;
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "device: expected a str ('cpu' or 'cuda'), got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *s = rd_str_text(obj);
    if (!s && PyErr_Occurred()) return -1;
    rd_status st = rd_backend_get(s ? s : "", out);
    if (st == RD_EINVAL)
        PyErr_Format(PyExc_ValueError, "device: expected 'cpu' or 'cuda', got %R", obj);
    else if (st)
        rd_raise(st);
    return st ? -1 : 0;
}

int rd_device_ready(const rd_backend *be) {
#ifdef RD_HAVE_CUDA
    if (be == &rd_backend_cuda && rd_cuda_device_count() == 0) {
        PyErr_SetString(PyExc_RuntimeError, "CUDA not available: racedit was built with CUDA "
                        "but no CUDA device is usable (no GPU or no driver)");
        return -1;
    }
#else
    (void)be;
#endif
    return 0;
}

/* ---- one call's arrays ------------------------------------------------------------------ */

static PyArrayObject *call_add(rd_call *c, PyArrayObject *a, int own, int out, int init) {
    if (!a) return NULL;
    if (c->n == RD_CALL_MAX) {
        if (own) Py_DECREF(a);
        PyErr_Format(PyExc_RuntimeError, "binding: more than %d arrays in one call", RD_CALL_MAX);
        return NULL;
    }
    c->item[c->n++] = (rd_call_item){a, NULL, (unsigned char)own, (unsigned char)out, 0,
                                     (unsigned char)init};
    return a;
}

PyArrayObject *rd_call_add(rd_call *c, PyArrayObject *a, int own, int out) {
    return call_add(c, a, own, out, RD_INIT_UPLOAD);
}

PyArrayObject *rd_call_in(rd_call *c, PyObject *obj, const char *name, int typenum, int ndim,
                          const npy_intp *shape) {
    return rd_call_add(c, rd_in_array(obj, name, typenum, ndim, shape), 1, 0);
}

PyArrayObject *rd_call_out(rd_call *c, PyObject *obj, const char *name, int typenum, int ndim,
                           const npy_intp *shape) {
    return rd_call_add(c, rd_out_array(obj, name, typenum, ndim, shape), 0, 1);
}

PyArrayObject *rd_call_new(rd_call *c, int ndim, const npy_intp *shape, int typenum) {
    return call_add(c, rd_new_array(ndim, shape, typenum), 1, 1, RD_INIT_ZERO);
}

PyArrayObject *rd_call_scratch(rd_call *c, int ndim, const npy_intp *shape, int typenum) {
    PyArrayObject *e = (PyArrayObject *)PyArray_EMPTY(ndim, (npy_intp *)shape, typenum, 0);
    return call_add(c, e, 1, 0, RD_INIT_NONE);
}

int rd_call_stage(rd_call *c, const rd_backend *be) {
    c->be = be;
    c->status = RD_OK;
    if (rd_device_ready(be) < 0) return -1;
    for (int i = 0; i < c->n && !c->status; i++) {
        rd_call_item *it = &c->item[i];
        if (be->host_memory) { it->dev = PyArray_DATA(it->a); continue; }
        /* an array registered twice (an input that is also written) has one copy, as it has
         * one memory on the host: the op sees it wherever the array is passed
         * (rd_call_dev finds the first entry), and that entry downloads it if either does */
        int j = 0;
        while (j < i && c->item[j].a != it->a) j++;
        if (j < i) {
            c->item[j].out |= it->out;
            it->dev = c->item[j].dev;
            continue;
        }
        const size_t bytes = (size_t)PyArray_NBYTES(it->a);
        c->status = be->alloc(&it->dev, bytes);
        it->copied = it->dev != NULL;
        if (!c->status && it->init == RD_INIT_UPLOAD)
            c->status = be->upload(it->dev, PyArray_DATA(it->a), bytes);
        else if (!c->status && it->init == RD_INIT_ZERO)
            c->status = be->memset(it->dev, 0, bytes);
    }
    return 0;
}

void *rd_call_dev(const rd_call *c, const PyArrayObject *a) {
    for (int i = 0; a && i < c->n; i++)
        if (c->item[i].a == a) return c->item[i].dev;
    return NULL;
}

int rd_call_finish(rd_call *c, rd_status st) {
    if (!st) st = c->status;
    for (int i = 0; i < c->n; i++) {
        rd_call_item *it = &c->item[i];
        if (!it->copied) continue;
        if (!st && it->out)
            st = c->be->download(PyArray_DATA(it->a), it->dev, (size_t)PyArray_NBYTES(it->a));
        c->be->free(it->dev);
        it->copied = 0;
    }
    if (st) rd_raise(st);
    return st ? -1 : 0;
}

void rd_call_end(rd_call *c) {
    for (int i = 0; i < c->n; i++) {
        if (c->item[i].copied) c->be->free(c->item[i].dev); /* staged, never run */
        if (c->item[i].own) Py_DECREF(c->item[i].a);
    }
    c->n = 0;
    if (c->free_fn && c->free_arg) c->free_fn(c->free_arg);
    c->free_arg = NULL;
    if (c->busy) rd_give(c->busy);
    c->busy = NULL;
}

/* ---- the MoE configuration ------------------------------------------------------------ */

/* The int or float field of `c` named k, or NULL. */
static int64_t *int_field(rd_moe_cfg *c, const char *k) {
    return !strcmp(k, "dim") ? &c->D : !strcmp(k, "num_experts") ? &c->E
         : !strcmp(k, "expert_hidden") ? &c->He : !strcmp(k, "k") ? &c->k
         : !strcmp(k, "plr_dim") ? &c->plr_dim : NULL;
}

static float *float_field(rd_moe_cfg *c, const char *k) {
    return !strcmp(k, "beta") ? &c->beta : !strcmp(k, "sim_weight") ? &c->sim_weight
         : !strcmp(k, "balance_weight") ? &c->balance_weight
         : !strcmp(k, "plr_weight") ? &c->plr_weight : NULL;
}

static int set_setting(rd_moe_cfg *n, const char *k, PyObject *val) {
    int64_t *iv = int_field(n, k);
    float *fv = float_field(n, k);
    if (iv) return rd_parse_int(val, k, iv);
    if (fv) {
        double v;
        if (rd_parse_real(val, k, &v) < 0) return -1;
        if (!isfinite(v)) {
            PyErr_Format(PyExc_ValueError, "%s: expected a finite number, got %R", k, val);
            return -1;
        }
        *fv = (float)v;
        return 0;
    }
    if (!strcmp(k, "strategy")) return rd_parse_strategy(val, "strategy", &n->strategy);
    if (!strcmp(k, "gating")) return rd_parse_gating(val, "gating", &n->gating);
    if (!strcmp(k, "eval_topk")) {
        int b = PyObject_IsTrue(val);
        if (b >= 0) n->eval_topk = b;
        return b < 0 ? -1 : 0;
    }
    PyErr_Format(PyExc_TypeError, "unknown MoE setting '%s'", k);
    return -1;
}

int rd_parse_moe_settings(PyObject *kw, rd_moe_cfg *c, int check) {
    rd_moe_cfg n = *c;
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    while (kw && PyDict_Next(kw, &pos, &key, &val)) {
        const char *k = rd_str_text(key);
        if (!k) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "unknown MoE setting %R", key);
            return -1;
        }
        if (set_setting(&n, k, val) < 0) return -1;
    }
    rd_status s = check ? rd_moe_cfg_check(&n) : RD_OK;
    if (!s && check) s = rd_moe_aux_weights_check(&n);
    if (s) {
        rd_raise(s);
        return -1;
    }
    *c = n;
    return 0;
}

PyObject *rd_split_settings(PyObject *kw, PyObject **device, PyObject **precision) {
    *device = kw ? PyDict_GetItemString(kw, "device") : NULL;
    *precision = kw ? PyDict_GetItemString(kw, "precision") : NULL;
    PyObject *rest = kw ? PyDict_Copy(kw) : PyDict_New();
    if (rest && ((*device && PyDict_DelItemString(rest, "device") < 0) ||
                 (*precision && PyDict_DelItemString(rest, "precision") < 0)))
        Py_CLEAR(rest);
    return rest;
}

PyObject *rd_moe_settings_dict(const rd_moe_cfg *c) {
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:s,s:s,s:d,s:O,s:d,s:d,s:d}",
                         "dim", (long long)c->D, "num_experts", (long long)c->E, "expert_hidden",
                         (long long)c->He, "k", (long long)c->k, "plr_dim", (long long)c->plr_dim,
                         "strategy", rd_strategy_name(c->strategy), "gating",
                         rd_gating_name(c->gating), "beta", (double)c->beta, "eval_topk",
                         c->eval_topk ? Py_True : Py_False, "sim_weight", (double)c->sim_weight,
                         "balance_weight", (double)c->balance_weight, "plr_weight",
                         (double)c->plr_weight);
}

/* ---- what a MoE layer's forward left --------------------------------------------------- */

PyObject *rd_download_array(const rd_backend *be, const void *src, int ndim,
                            const npy_intp *shape, int typenum) {
    PyArrayObject *a = rd_new_array(ndim, shape, typenum);
    if (!a) return NULL;
    rd_status s = be->download(PyArray_DATA(a), src, (size_t)PyArray_NBYTES(a));
    if (s) {
        Py_DECREF(a);
        return rd_raise(s);
    }
    return (PyObject *)a;
}

static int dict_put(PyObject *d, const char *key, PyObject *v) {
    if (!v) return -1;
    int r = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return r;
}

static PyObject *loss_or_none(int has, float v) {
    return has ? PyFloat_FromDouble((double)v) : Py_NewRef(Py_None);
}

static PyObject *tau_or_none(int have, float v) {
    return have ? PyFloat_FromDouble((double)v) : Py_NewRef(Py_None);
}

int rd_parse_thresholds(PyObject *o, const char *name, PyArrayObject **out) {
    *out = NULL;
    if (o == Py_None) return 0;
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(o, NPY_FLOAT32, 0, 1,
                                                        NPY_ARRAY_CARRAY | NPY_ARRAY_FORCECAST);
    if (!a) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a number, a 1-D sequence of numbers or "
                     "None, got %s", name, Py_TYPE(o)->tp_name);
        return -1;
    }
    if (PyArray_NDIM(a) == 0) {
        npy_intp one[1] = {1};
        PyArray_Dims d = {one, 1};
        PyArrayObject *r = (PyArrayObject *)PyArray_Newshape(a, &d, NPY_CORDER);
        Py_DECREF(a);
        if (!r) return -1;
        a = r;
    }
    const float *v = (const float *)PyArray_DATA(a);
    for (npy_intp i = 0; i < PyArray_SIZE(a); i++)
        if (v[i] != v[i]) {
            PyErr_Format(PyExc_ValueError, "%s: expected numbers or None, got nan at index %lld",
                         name, (long long)i);
            Py_DECREF(a);
            return -1;
        }
    *out = a;
    return 0;
}

PyObject *rd_thresholds_of(const rd_moe_view *v) {
    if (!v->have_tau) Py_RETURN_NONE;
    npy_intp n[1] = {(npy_intp)v->ntau};
    PyArrayObject *a = rd_new_array(1, n, NPY_FLOAT32);
    if (a && v->ntau) memcpy(PyArray_DATA(a), v->taus, (size_t)v->ntau * sizeof(float));
    return (PyObject *)a;
}

static PyObject *int64_copy(const int64_t *src, int64_t n) {
    npy_intp s[1] = {(npy_intp)n};
    PyArrayObject *a = rd_new_array(1, s, NPY_INT64);
    if (a && n) memcpy(PyArray_DATA(a), src, (size_t)n * sizeof(int64_t));
    return (PyObject *)a;
}

/* The entries that come from arrays: expert_load (host memory) and, with `pred`, plr_pred
 * (the one download). */
static int aux_arrays(PyObject *d, const rd_backend *be, const rd_moe_view *v,
                      const rd_moe_aux *a, int pred) {
    npy_intp sp[3] = {v->B, v->L, (npy_intp)a->plr_dim};
    if (dict_put(d, "expert_load", int64_copy(a->load, a->E)) < 0) return -1;
    if (!pred) return 0;
    PyObject *p = a->plr_pred ? rd_download_array(be, a->plr_pred, 3, sp, NPY_FLOAT32)
                              : Py_NewRef(Py_None);
    return dict_put(d, "plr_pred", p);
}

static PyObject *moe_aux_dict(const rd_backend *be, void *st, int pred) {
    rd_moe_view v;
    rd_moe_aux a;
    rd_status s = be->moe_view(st, &v);
    if (!s && v.have_forward) s = be->moe_aux(st, &a);
    if (s) return rd_raise(s);
    if (!v.have_forward) Py_RETURN_NONE;
    PyObject *d = PyDict_New();
    if (!d || dict_put(d, "sim_loss", loss_or_none(a.has_sim, a.sim_loss)) ||
        dict_put(d, "balance_loss", loss_or_none(a.has_balance, a.balance_loss)) ||
        dict_put(d, "plr_loss", loss_or_none(a.has_plr, a.plr_loss)) ||
        dict_put(d, "aux_loss", PyFloat_FromDouble((double)a.aux_loss)) ||
        dict_put(d, "max_violation", PyFloat_FromDouble(a.max_violation)) ||
        dict_put(d, "combination_usage", PyFloat_FromDouble(a.combination_usage)) ||
        dict_put(d, "dead_experts", PyLong_FromLongLong((long long)a.dead_experts)) ||
        dict_put(d, "experts_per_token", PyFloat_FromDouble(a.experts_per_token)) ||
        dict_put(d, "threshold", tau_or_none(v.have_tau && v.ntau > 0, v.tau)) ||
        dict_put(d, "batch_threshold", tau_or_none(v.have_tau, v.tau_b)) ||
        dict_put(d, "training", PyBool_FromLong(a.training)) ||
        aux_arrays(d, be, &v, &a, pred) < 0)
        Py_CLEAR(d);
    return d;
}

PyObject *rd_moe_get(const rd_backend *be, void *st, const char *name) {
    static const char *const known[] = {"threshold", "aux", "batch_threshold", "mask", "gates",
                                        "logits", "hidden", "counts", "pairs", "thresholds",
                                        "aux_stats", "sample_pairs"};
    int k = 0;
    while (k < 12 && strcmp(name, known[k])) k++;
    if (k == 12) {
        PyErr_Format(PyExc_ValueError, "name: expected one of threshold, thresholds, "
                     "batch_threshold, mask, gates, logits, hidden, counts, pairs, "
                     "sample_pairs, aux, aux_stats; got '%s'", name);
        return NULL;
    }
    if (k == 1 || k == 10) return moe_aux_dict(be, st, k == 1);
    rd_moe_view v;
    rd_status s = be->moe_view(st, &v);
    if (s) return rd_raise(s);
    if (k == 0) return tau_or_none(v.have_tau && v.ntau > 0, v.tau);
    if (k == 9) return rd_thresholds_of(&v);
    if (!v.have_forward) Py_RETURN_NONE;
    npy_intp sE3[3] = {v.B, v.L, v.E}, sD3[3] = {v.B, v.L, v.D};
    switch (k) {
    case 2: return PyFloat_FromDouble(v.tau_b);
    case 3: return rd_download_array(be, v.mask, 3, sE3, NPY_BOOL);
    case 4: return rd_download_array(be, v.G, 3, sE3, NPY_FLOAT32);
    case 5: return rd_download_array(be, v.R, 3, sE3, NPY_FLOAT32);
    case 6: return rd_download_array(be, v.h, 3, sD3, NPY_FLOAT32);
    case 7: return int64_copy(v.counts, v.E);
    case 11: {
        npy_intp sB[1] = {v.B};
        PyArrayObject *a = rd_new_array(1, sB, NPY_INT64);
        s = a ? be->mask_row_counts((int64_t *)PyArray_DATA(a), v.mask, v.B, v.L * v.E) : RD_OK;
        if (s) Py_CLEAR(a);
        return s ? rd_raise(s) : (PyObject *)a;
    }
    default: return PyLong_FromLongLong(v.P);
    }
}
