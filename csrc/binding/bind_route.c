/* bind_route.c — Python functions of the route area: route, route_threshold (on any
 * device), route_plan. */
#include "bind.h"

/* route(scores, k, strategy, device="cpu") -> (mask, tau_b). Shape and k checks with
 * messages in Python terms, before the C core's own checks. */
static PyObject *py_route(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"scores", "k", "strategy", "device", NULL};
    PyObject *o_scores, *o_k, *o_strategy, *odev = NULL, *ret = NULL;
    PyArrayObject *scores, *mask, *tau;
    const rd_backend *be;
    int64_t k, ng, K;
    rd_strategy s;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|$O:route", kws, &o_scores, &o_k, &o_strategy,
                                     &odev) ||
        rd_parse_device(odev, &be) < 0 || rd_parse_int(o_k, "k", &k) < 0 ||
        rd_parse_strategy(o_strategy, "strategy", &s) < 0)
        return NULL;
    RD_IN(c, scores, o_scores, "scores", NPY_FLOAT32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = PyArray_DIM(scores, 0), L = PyArray_DIM(scores, 1), E = PyArray_DIM(scores, 2);
    if (rd_check_route_args(B, L, E, k) < 0) goto done;
    RD_CHECK(rd_route_plan(&ng, &K, B, L, E, k, s));
    RD_NEW(c, mask, NPY_BOOL, 3, B, L, E);
    RD_NEW(c, tau, NPY_FLOAT32, 1, 1);
    RD_CALL_RUN(c, be, be->route(RD_DEV(c, mask), RD_DEV(c, tau), RD_DEV(c, scores), B, L, E, k, s));
    ret = Py_BuildValue("Od", (PyObject *)mask, (double)*(float *)PyArray_DATA(tau));
done:
    rd_call_end(&c);
    return ret;
}

/* route_threshold(scores, tau, device="cpu") -> mask = scores >= tau. */
static PyObject *py_route_threshold(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"scores", "tau", "device", NULL};
    PyObject *o_scores, *o_tau, *odev = NULL, *ret = NULL;
    PyArrayObject *scores, *mask;
    const rd_backend *be;
    double tau;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$O:route_threshold", kws, &o_scores, &o_tau,
                                     &odev) ||
        rd_parse_device(odev, &be) < 0 || rd_threshold_args(o_scores, o_tau, &scores, &tau) < 0 ||
        !rd_call_add(&c, scores, 1, 0) ||
        !(mask = rd_call_new(&c, PyArray_NDIM(scores), PyArray_DIMS(scores), NPY_BOOL)))
        goto done;
    RD_CALL_RUN(c, be, be->route_threshold(RD_DEV(c, mask), RD_DEV(c, scores),
                                           (int64_t)PyArray_SIZE(scores), (float)tau));
    ret = Py_NewRef((PyObject *)mask);
done:
    rd_call_end(&c);
    return ret;
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

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef route_methods[] = {
    {"route", KW py_route, METH_VARARGS | METH_KEYWORDS,
     "route(scores (B,L,E) float32, k, strategy, device='cpu') -> (mask (B,L,E) bool, tau_b)"},
    {"route_threshold", KW py_route_threshold, METH_VARARGS | METH_KEYWORDS,
     "route_threshold(scores float32, tau, device='cpu') -> mask bool = scores >= tau"},
    {"route_plan", py_route_plan, METH_VARARGS,
     "route_plan(B, L, E, k, strategy) -> (ngroups, K)"},
    {NULL, NULL, 0, NULL}};

int rd_bind_route(PyObject *m) { return PyModule_AddFunctions(m, route_methods); }
