/* bind_route.c — Python functions of the route area: route, route_threshold, route_plan. */
#include "bind.h"

/* Shape and k checks with messages in Python terms, before the C core's own checks. */
static PyObject *py_route(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_scores, *o_k, *o_strategy, *ret = NULL;
    PyArrayObject *scores = NULL, *mask = NULL;
    int64_t k;
    rd_strategy s;
    if (!PyArg_ParseTuple(args, "OOO:route", &o_scores, &o_k, &o_strategy)) return NULL;
    if (rd_parse_int(o_k, "k", &k) < 0 || rd_parse_strategy(o_strategy, "strategy", &s) < 0)
        return NULL;
    scores = rd_in_array(o_scores, "scores", NPY_FLOAT32, 3, NULL);
    if (!scores) goto fail;
    npy_intp *dims = PyArray_DIMS(scores);
    int64_t B = dims[0], L = dims[1], E = dims[2];
    if (rd_check_route_args(B, L, E, k) < 0) goto fail;
    int64_t ng, K;
    rd_status st = rd_route_plan(&ng, &K, B, L, E, k, s);
    if (st != RD_OK) { rd_raise(st); goto fail; }
    mask = rd_new_array(3, dims, NPY_BOOL);
    if (!mask) goto fail;
    float tau = 0.0f;
    Py_BEGIN_ALLOW_THREADS
    st = rd_route((uint8_t *)PyArray_DATA(mask), &tau, (const float *)PyArray_DATA(scores), B, L,
                  E, k, s);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); goto fail; }
    ret = Py_BuildValue("Od", (PyObject *)mask, (double)tau);
fail:
    Py_XDECREF(scores);
    Py_XDECREF(mask);
    return ret;
}

static PyObject *py_route_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_scores, *o_tau;
    PyArrayObject *scores = NULL, *mask = NULL;
    double tau;
    if (!PyArg_ParseTuple(args, "OO:route_threshold", &o_scores, &o_tau)) return NULL;
    if (rd_threshold_args(o_scores, o_tau, &scores, &tau) < 0) return NULL;
    mask = rd_new_array(PyArray_NDIM(scores), PyArray_DIMS(scores), NPY_BOOL);
    if (!mask) goto fail;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = rd_route_threshold((uint8_t *)PyArray_DATA(mask), (const float *)PyArray_DATA(scores),
                            (int64_t)PyArray_SIZE(scores), (float)tau);
    Py_END_ALLOW_THREADS
    if (st != RD_OK) { rd_raise(st); Py_CLEAR(mask); }
fail:
    Py_DECREF(scores);
    return (PyObject *)mask;
}

static PyObject *py_route_plan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o[4], *o_strategy;
    const char *names[4] = {"B", "L", "E", "k"};
    int64_t v[4];
    rd_strategy s;
    if (!PyArg_ParseTuple(args, "OOOOO:route_plan", &o[0], &o[1], &o[2], &o[3], &o_strategy))
        return NULL;
    for (int i = 0; i < 4; i++)
        if (rd_parse_int(o[i], names[i], &v[i]) < 0) return NULL;
    if (rd_parse_strategy(o_strategy, "strategy", &s) < 0) return NULL;
    for (int i = 0; i < 3; i++)
        if (v[i] < 1) {
            PyErr_Format(PyExc_ValueError, "%s: expected >= 1, got %lld", names[i], (long long)v[i]);
            return NULL;
        }
    if (rd_check_route_args(v[0], v[1], v[2], v[3]) < 0) return NULL;
    int64_t ng, K;
    rd_status st = rd_route_plan(&ng, &K, v[0], v[1], v[2], v[3], s);
    if (st != RD_OK) return rd_raise(st);
    return Py_BuildValue("LL", (long long)ng, (long long)K);
}

static PyMethodDef route_methods[] = {
    {"route", py_route, METH_VARARGS,
     "route(scores (B,L,E) float32, k, strategy) -> (mask (B,L,E) bool, tau_b float)"},
    {"route_threshold", py_route_threshold, METH_VARARGS,
     "route_threshold(scores float32, tau) -> mask bool = scores >= tau"},
    {"route_plan", py_route_plan, METH_VARARGS,
     "route_plan(B, L, E, k, strategy) -> (ngroups, K)"},
    {NULL, NULL, 0, NULL}};

int rd_bind_route(PyObject *m) { return PyModule_AddFunctions(m, route_methods); }
