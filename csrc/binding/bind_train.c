/* bind_train.c — Python functions of the optimiser area (racedit._C.adamw_step,
 * grad_norm, nonfinite_index on any device; ema_update). The buffers written to are never
 * converted (rd_out_array); the read-only ones must already be float32, 1-D, contiguous
 * and of the same length, and no two may overlap. */
#include "bind.h"

#include <math.h>
#include <string.h>

/* A read-only float32 1-D buffer that the kernel reads as-is (no silent conversion:
 * a converted copy of a gradient buffer would hide a dtype bug in the caller). */
static PyArrayObject *in_buffer(PyObject *obj, const char *name, npy_intp n) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype float32, got %s",
                     name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype float32, got %s", name,
                     PyArray_DESCR(a)->typeobj->tp_name);
        return NULL;
    }
    if (PyArray_NDIM(a) != 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 1-d array, got ndim=%d", name,
                     PyArray_NDIM(a));
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous, aligned array", name);
        return NULL;
    }
    if (n != RD_ANY && PyArray_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld,), got (%lld,)", name,
                     (long long)n, (long long)PyArray_DIM(a, 0));
        return NULL;
    }
    return a;
}

static int overlap(PyArrayObject *a, PyArrayObject *b) {
    const char *pa = PyArray_BYTES(a), *pb = PyArray_BYTES(b);
    npy_intp na = PyArray_NBYTES(a), nb = PyArray_NBYTES(b);
    if (na == 0 || nb == 0) return 0;
    return pa < pb + nb && pb < pa + na;
}

/* Raise ValueError if any two of arrs[0..k) share memory. */
static int check_disjoint(PyArrayObject **arrs, const char **names, int k) {
    for (int i = 0; i < k; i++)
        for (int j = i + 1; j < k; j++)
            if (overlap(arrs[i], arrs[j])) {
                PyErr_Format(PyExc_ValueError, "%s and %s must not share memory", names[i],
                             names[j]);
                return -1;
            }
    return 0;
}

/* ValueError "<name>: expected <expect>, got <x>" (PyErr_Format has no %g). */
static int bad_value(const char *name, const char *expect, double x) {
    char buf[64];
    snprintf(buf, sizeof buf, "%g", x);
    PyErr_Format(PyExc_ValueError, "%s: expected %s, got %s", name, expect, buf);
    return -1;
}

/* adamw_step(params, grads, m, v, *, lr, step, beta1, beta2, eps, weight_decay, grad_scale,
 * ema=None, ema_decay=0.9999, device='cpu'): params, m, v (and ema, from the updated
 * params) updated in place. */
static PyObject *py_adamw_step(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"params", "grads", "m", "v", "lr", "step", "beta1", "beta2", "eps",
                             "weight_decay", "grad_scale", "ema", "ema_decay", "device", NULL};
    PyObject *po, *go, *mo, *vo, *eo = Py_None, *odev = NULL, *ret = NULL;
    double lr, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, wd = 0.0, grad_scale = 1.0, ema_decay = 0.9999;
    long long step;
    const rd_backend *be;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO$dLdddddOdO", kwlist, &po, &go, &mo, &vo, &lr,
                                     &step, &beta1, &beta2, &eps, &wd, &grad_scale, &eo, &ema_decay,
                                     &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    PyArrayObject *a[5] = {rd_out_array(po, "params", NPY_FLOAT32, 1, NULL)};
    if (!a[0]) return NULL;
    npy_intp n = PyArray_DIM(a[0], 0), shp[1] = {n};
    if (!(a[1] = in_buffer(go, "grads", n)) || !(a[2] = rd_out_array(mo, "m", NPY_FLOAT32, 1, shp)) ||
        !(a[3] = rd_out_array(vo, "v", NPY_FLOAT32, 1, shp)) ||
        (eo != Py_None && !(a[4] = rd_out_array(eo, "ema", NPY_FLOAT32, 1, shp))))
        return NULL;
    const char *names[5] = {"params", "grads", "m", "v", "ema"};
    if (check_disjoint(a, names, eo != Py_None ? 5 : 4) < 0) return NULL;
    if (!isfinite(lr) || lr < 0) return (void)bad_value("lr", "a finite value >= 0", lr), NULL;
    if (!(beta1 >= 0 && beta1 < 1))
        return (void)bad_value("beta1", "a value in [0, 1)", beta1), NULL;
    if (!(beta2 >= 0 && beta2 < 1))
        return (void)bad_value("beta2", "a value in [0, 1)", beta2), NULL;
    if (!isfinite(eps) || eps <= 0) return (void)bad_value("eps", "a finite value > 0", eps), NULL;
    if (!isfinite(wd) || wd < 0)
        return (void)bad_value("weight_decay", "a finite value >= 0", wd), NULL;
    if (!isfinite(grad_scale) || grad_scale < 0)
        return (void)bad_value("grad_scale", "a finite value >= 0", grad_scale), NULL;
    if (a[4] && !(ema_decay >= 0 && ema_decay <= 1))
        return (void)bad_value("ema_decay", "a value in [0, 1]", ema_decay), NULL;
    if (step < 1) {
        PyErr_Format(PyExc_ValueError, "step: expected an int >= 1 (1-based), got %lld", step);
        return NULL;
    }
    rd_call c = {0};
    for (int i = 0; i < 5; i++) rd_call_add(&c, a[i], 0, i != 1);
    RD_CALL_RUN(c, be, be->adamw_step(RD_DEV(c, a[0]), RD_DEV(c, a[1]), RD_DEV(c, a[2]),
                                      RD_DEV(c, a[3]), RD_DEV(c, a[4]), (int64_t)n, lr, beta1,
                                      beta2, eps, wd, (int64_t)step, grad_scale, ema_decay));
    ret = Py_NewRef(Py_None);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_grad_norm(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"grads", "device", NULL};
    PyObject *go, *odev = NULL, *ret = NULL;
    const rd_backend *be;
    rd_call c = {0};
    double out = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$O", kwlist, &go, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    PyArrayObject *g = rd_call_add(&c, in_buffer(go, "grads", RD_ANY), 0, 0);
    if (!g || rd_device_ready(be) < 0) return NULL;
    c.free_fn = be->ctx_free;
    RD_CHECK(be->ctx_new(&c.free_arg));
    RD_CALL_RUN(c, be, be->grad_norm(c.free_arg, &out, RD_DEV(c, g), (int64_t)PyArray_DIM(g, 0)));
    ret = PyFloat_FromDouble(out);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_ema_update(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"ema", "params", "decay", NULL};
    PyObject *eo, *po;
    double decay;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOd", kwlist, &eo, &po, &decay)) return NULL;
    PyArrayObject *e = rd_out_array(eo, "ema", NPY_FLOAT32, 1, NULL);
    if (!e) return NULL;
    PyArrayObject *p = in_buffer(po, "params", PyArray_DIM(e, 0));
    if (!p) return NULL;
    PyArrayObject *all[2] = {e, p};
    const char *names[2] = {"ema", "params"};
    if (check_disjoint(all, names, 2) < 0) return NULL;
    if (!(decay >= 0 && decay <= 1))
        return (void)bad_value("decay", "a value in [0, 1]", decay), NULL;
    RD_RUN(rd_ema_update((float *)PyArray_DATA(e), (const float *)PyArray_DATA(p),
                         (int64_t)PyArray_DIM(e, 0), decay));
    Py_RETURN_NONE;
done:
    return NULL;
}

static PyObject *py_nonfinite_index(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kwlist[] = {"x", "device", NULL};
    PyObject *xo, *odev = NULL, *ret = NULL;
    const rd_backend *be;
    rd_call c = {0};
    int64_t idx = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$O", kwlist, &xo, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    PyArrayObject *x = rd_call_add(&c, in_buffer(xo, "x", RD_ANY), 0, 0);
    if (!x) return NULL;
    RD_CALL_RUN(c, be, be->nonfinite_index(&idx, RD_DEV(c, x), (int64_t)PyArray_DIM(x, 0)));
    ret = PyLong_FromLongLong((long long)idx);
done:
    rd_call_end(&c);
    return ret;
}

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef train_methods[] = {
    {"adamw_step", KW py_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(params, grads, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, "
     "weight_decay=0, grad_scale=1, ema=None, ema_decay=0.9999, device='cpu'): one fused AdamW "
     "update in place (float32 1-D buffers), with the EMA of the updated params when ema is given."},
    {"grad_norm", KW py_grad_norm, METH_VARARGS | METH_KEYWORDS,
     "grad_norm(grads, device='cpu') -> float: the L2 norm, accumulated in double, "
     "thread-count independent."},
    {"ema_update", KW py_ema_update, METH_VARARGS | METH_KEYWORDS,
     "ema_update(ema, params, decay): ema <- decay*ema + (1-decay)*params in place."},
    {"nonfinite_index", KW py_nonfinite_index, METH_VARARGS | METH_KEYWORDS,
     "nonfinite_index(x, device='cpu') -> int: the first index holding NaN/Inf, or -1."},
    {NULL, NULL, 0, NULL}};

int rd_bind_train(PyObject *m) { return PyModule_AddFunctions(m, train_methods); }
