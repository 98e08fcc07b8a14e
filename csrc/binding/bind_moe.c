/* bind_moe.c — Python functions of the MoE block: the ops (gate, router, experts) as
 * functions on NumPy arrays, and the per-layer state behind racedit.MoE (a PyCapsule
 * owning an rd_moe_state and its rd_moe_cfg). Every argument is validated here; the
 * GIL is released around the C kernels only. */
#include "bind.h"

#include <math.h>
#include <string.h>

#define NIN 12 /* most input arrays one function converts */

static void release(PyArrayObject **in) {
    for (int i = 0; i < NIN; i++) Py_XDECREF(in[i]);
}

#define F32(a) ((float *)PyArray_DATA(a))
#define U8(a) ((uint8_t *)PyArray_DATA(a))

/* ---- gating ---------------------------------------------------------------- */

static PyObject *py_gate_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"R", "gating", NULL};
    PyObject *oR, *og = NULL, *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *G = NULL;
    rd_gating g = RD_GATE_IDENTITY;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:gate_forward", kws, &oR, &og)) return NULL;
    if (og && rd_parse_gating(og, "gating", &g) < 0) return NULL;
    if (!(in[0] = rd_in_array(oR, "R", NPY_FLOAT32, 2, NULL))) goto done;
    npy_intp N = PyArray_DIM(in[0], 0), E = PyArray_DIM(in[0], 1);
    if (E < 1) { PyErr_Format(PyExc_ValueError, "R: expected E >= 1 columns, got shape (%zd, %zd)", N, E); goto done; }
    npy_intp sh[2] = {N, E};
    if (!(G = rd_new_array(2, sh, NPY_FLOAT32))) goto done;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_gate_forward(F32(G), F32(in[0]), N, E, g);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = (PyObject *)G; G = NULL;
done:
    Py_XDECREF(G);
    release(in);
    return ret;
}

static PyObject *py_gate_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dG", "G", "gating", NULL};
    PyObject *odG, *oG, *og = NULL, *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *dR = NULL;
    rd_gating g = RD_GATE_IDENTITY;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:gate_backward", kws, &odG, &oG, &og)) return NULL;
    if (og && rd_parse_gating(og, "gating", &g) < 0) return NULL;
    if (!(in[0] = rd_in_array(oG, "G", NPY_FLOAT32, 2, NULL))) goto done;
    npy_intp N = PyArray_DIM(in[0], 0), E = PyArray_DIM(in[0], 1);
    if (E < 1) { PyErr_Format(PyExc_ValueError, "G: expected E >= 1 columns, got shape (%zd, %zd)", N, E); goto done; }
    npy_intp sh[2] = {N, E};
    if (!(in[1] = rd_in_array(odG, "dG", NPY_FLOAT32, 2, sh))) goto done;
    if (!(dR = rd_new_array(2, sh, NPY_FLOAT32))) goto done;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_gate_backward(F32(dR), F32(in[1]), F32(in[0]), N, E, g);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = (PyObject *)dR; dR = NULL;
done:
    Py_XDECREF(dR);
    release(in);
    return ret;
}

/* ---- router ---------------------------------------------------------------- */

/* x (N,D), Wr (D,D), br (D), Wg (D,E), bg (E): converts into in[0..4]; sets N, D, E. */
static int router_inputs(PyArrayObject **in, PyObject *ox, PyObject *oWr, PyObject *obr,
                         PyObject *oWg, PyObject *obg, npy_intp *N, npy_intp *D, npy_intp *E) {
    if (!(in[0] = rd_in_array(ox, "x", NPY_FLOAT32, 2, NULL))) return -1;
    *N = PyArray_DIM(in[0], 0);
    *D = PyArray_DIM(in[0], 1);
    if (*D < 1) { PyErr_SetString(PyExc_ValueError, "x: expected D >= 1 columns, got 0"); return -1; }
    npy_intp sWr[2] = {*D, *D}, sbr[1] = {*D}, sWg[2] = {*D, RD_ANY};
    if (!(in[1] = rd_in_array(oWr, "Wr", NPY_FLOAT32, 2, sWr))) return -1;
    if (!(in[2] = rd_in_array(obr, "br", NPY_FLOAT32, 1, sbr))) return -1;
    if (!(in[3] = rd_in_array(oWg, "Wg", NPY_FLOAT32, 2, sWg))) return -1;
    *E = PyArray_DIM(in[3], 1);
    if (*E < 1) { PyErr_SetString(PyExc_ValueError, "Wg: expected E >= 1 columns, got 0"); return -1; }
    npy_intp sbg[1] = {*E};
    if (!(in[4] = rd_in_array(obg, "bg", NPY_FLOAT32, 1, sbg))) return -1;
    return 0;
}

static PyObject *py_router_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"x", "Wr", "br", "Wg", "bg", NULL};
    PyObject *ox, *oWr, *obr, *oWg, *obg, *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *hpre = NULL, *h = NULL, *R = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:router_forward", kws, &ox, &oWr, &obr,
                                     &oWg, &obg))
        return NULL;
    npy_intp N, D, E;
    if (router_inputs(in, ox, oWr, obr, oWg, obg, &N, &D, &E) < 0) goto done;
    npy_intp sND[2] = {N, D}, sNE[2] = {N, E};
    if (!(hpre = rd_new_array(2, sND, NPY_FLOAT32)) || !(h = rd_new_array(2, sND, NPY_FLOAT32)) ||
        !(R = rd_new_array(2, sNE, NPY_FLOAT32)))
        goto done;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_router_forward(F32(hpre), F32(h), F32(R), F32(in[0]), F32(in[1]), F32(in[2]),
                          F32(in[3]), F32(in[4]), N, D, E);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = Py_BuildValue("(NNN)", hpre, h, R);
    if (ret) hpre = h = R = NULL;
done:
    Py_XDECREF(hpre); Py_XDECREF(h); Py_XDECREF(R);
    release(in);
    return ret;
}

static PyObject *py_router_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dR", "hpre", "h", "x", "Wr", "Wg", "dh_extra", NULL};
    PyObject *odR, *ohpre, *oh, *ox, *oWr, *oWg, *oextra = Py_None, *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *out[5] = {0}, *dh = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO|O:router_backward", kws, &odR, &ohpre,
                                     &oh, &ox, &oWr, &oWg, &oextra))
        return NULL;
    if (!(in[0] = rd_in_array(ox, "x", NPY_FLOAT32, 2, NULL))) goto done;
    npy_intp N = PyArray_DIM(in[0], 0), D = PyArray_DIM(in[0], 1);
    if (D < 1) { PyErr_SetString(PyExc_ValueError, "x: expected D >= 1 columns, got 0"); goto done; }
    npy_intp sDD[2] = {D, D}, sWg[2] = {D, RD_ANY}, sND[2] = {N, D};
    if (!(in[1] = rd_in_array(oWr, "Wr", NPY_FLOAT32, 2, sDD))) goto done;
    if (!(in[2] = rd_in_array(oWg, "Wg", NPY_FLOAT32, 2, sWg))) goto done;
    npy_intp E = PyArray_DIM(in[2], 1);
    if (E < 1) { PyErr_SetString(PyExc_ValueError, "Wg: expected E >= 1 columns, got 0"); goto done; }
    npy_intp sNE[2] = {N, E}, sD[1] = {D}, sE[1] = {E}, sDE[2] = {D, E};
    if (!(in[3] = rd_in_array(odR, "dR", NPY_FLOAT32, 2, sNE))) goto done;
    if (!(in[4] = rd_in_array(ohpre, "hpre", NPY_FLOAT32, 2, sND))) goto done;
    if (!(in[5] = rd_in_array(oh, "h", NPY_FLOAT32, 2, sND))) goto done;
    if (oextra != Py_None && !(in[6] = rd_in_array(oextra, "dh_extra", NPY_FLOAT32, 2, sND))) goto done;
    if (!(out[0] = rd_new_array(2, sND, NPY_FLOAT32)) || !(out[1] = rd_new_array(2, sDD, NPY_FLOAT32)) ||
        !(out[2] = rd_new_array(1, sD, NPY_FLOAT32)) || !(out[3] = rd_new_array(2, sDE, NPY_FLOAT32)) ||
        !(out[4] = rd_new_array(1, sE, NPY_FLOAT32)) || !(dh = rd_new_array(2, sND, NPY_FLOAT32)))
        goto done;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_router_backward(F32(out[0]), F32(out[1]), F32(out[2]), F32(out[3]), F32(out[4]),
                           F32(dh), F32(in[3]), in[6] ? F32(in[6]) : NULL, F32(in[4]), F32(in[5]),
                           F32(in[0]), F32(in[1]), F32(in[2]), N, D, E);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = Py_BuildValue("(NNNNN)", out[0], out[1], out[2], out[3], out[4]);
    if (ret) memset(out, 0, sizeof out);
done:
    for (int i = 0; i < 5; i++) Py_XDECREF(out[i]);
    Py_XDECREF(dh);
    release(in);
    return ret;
}

/* ---- experts --------------------------------------------------------------- */

/* One workspace kept for the op-level calls so that repeated calls (notebooks,
 * benchmarks) do not reallocate; a call made while another thread uses it gets a fresh
 * one. */
static rd_experts *g_ws = NULL;
static rd_busy g_ws_busy;

static rd_experts *ws_take(void) {
    if (rd_try_take(&g_ws_busy)) {
        if (!g_ws) g_ws = rd_experts_new();
        if (g_ws) return g_ws;
        rd_give(&g_ws_busy);
    }
    return rd_experts_new();
}

static void ws_give(rd_experts *ex) {
    if (ex && ex == g_ws) rd_give(&g_ws_busy);
    else rd_experts_free(ex);
}

/* x (N,D), mask (N,E) bool, G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D). */
static int expert_inputs(PyArrayObject **in, PyObject *ox, PyObject *omask, PyObject *oG,
                         PyObject *ow1, PyObject *ob1, PyObject *ow2, PyObject *ob2,
                         npy_intp *N, npy_intp *D, npy_intp *E, npy_intp *He) {
    if (!(in[0] = rd_in_array(ox, "x", NPY_FLOAT32, 2, NULL))) return -1;
    *N = PyArray_DIM(in[0], 0);
    *D = PyArray_DIM(in[0], 1);
    npy_intp sw1[3] = {RD_ANY, *D, RD_ANY};
    if (!(in[1] = rd_in_array(ow1, "w1", NPY_FLOAT32, 3, sw1))) return -1;
    *E = PyArray_DIM(in[1], 0);
    *He = PyArray_DIM(in[1], 2);
    if (*D < 1 || *E < 1 || *He < 1) {
        PyErr_Format(PyExc_ValueError, "w1: expected shape (E, D, He) with D, E, He >= 1, got "
                     "D=%zd (from x) E=%zd He=%zd", *D, *E, *He);
        return -1;
    }
    npy_intp sNE[2] = {*N, *E}, sb1[2] = {*E, *He}, sw2[3] = {*E, *He, *D}, sb2[2] = {*E, *D};
    if (!(in[2] = rd_in_array(omask, "mask", NPY_BOOL, 2, sNE))) return -1;
    if (!(in[3] = rd_in_array(oG, "G", NPY_FLOAT32, 2, sNE))) return -1;
    if (!(in[4] = rd_in_array(ob1, "b1", NPY_FLOAT32, 2, sb1))) return -1;
    if (!(in[5] = rd_in_array(ow2, "w2", NPY_FLOAT32, 3, sw2))) return -1;
    if (!(in[6] = rd_in_array(ob2, "b2", NPY_FLOAT32, 2, sb2))) return -1;
    return 0;
}

static PyObject *py_experts_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"x", "mask", "G", "w1", "b1", "w2", "b2", NULL};
    PyObject *o[7], *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *y = NULL;
    rd_experts *ex = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO:experts_forward", kws, &o[0], &o[1],
                                     &o[2], &o[3], &o[4], &o[5], &o[6]))
        return NULL;
    npy_intp N, D, E, He;
    if (expert_inputs(in, o[0], o[1], o[2], o[3], o[4], o[5], o[6], &N, &D, &E, &He) < 0) goto done;
    npy_intp sND[2] = {N, D};
    if (!(y = rd_new_array(2, sND, NPY_FLOAT32))) goto done;
    if (!(ex = ws_take())) { PyErr_NoMemory(); goto done; }
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_experts_forward(ex, F32(y), U8(in[2]), F32(in[3]), F32(in[0]), F32(in[1]), F32(in[4]),
                           F32(in[5]), F32(in[6]), N, D, E, He);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = (PyObject *)y; y = NULL;
done:
    ws_give(ex);
    Py_XDECREF(y);
    release(in);
    return ret;
}

static PyObject *py_experts_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dy", "x", "mask", "G", "w1", "b1", "w2", "b2", NULL};
    PyObject *ody, *o[7], *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *out[6] = {0}, *y = NULL;
    rd_experts *ex = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOO:experts_backward", kws, &ody, &o[0],
                                     &o[1], &o[2], &o[3], &o[4], &o[5], &o[6]))
        return NULL;
    npy_intp N, D, E, He;
    if (expert_inputs(in, o[0], o[1], o[2], o[3], o[4], o[5], o[6], &N, &D, &E, &He) < 0) goto done;
    npy_intp sND[2] = {N, D}, sNE[2] = {N, E}, sw1[3] = {E, D, He}, sb1[2] = {E, He},
             sw2[3] = {E, He, D}, sb2[2] = {E, D};
    if (!(in[7] = rd_in_array(ody, "dy", NPY_FLOAT32, 2, sND))) goto done;
    if (!(out[0] = rd_new_array(2, sND, NPY_FLOAT32)) || !(out[1] = rd_new_array(2, sNE, NPY_FLOAT32)) ||
        !(out[2] = rd_new_array(3, sw1, NPY_FLOAT32)) || !(out[3] = rd_new_array(2, sb1, NPY_FLOAT32)) ||
        !(out[4] = rd_new_array(3, sw2, NPY_FLOAT32)) || !(out[5] = rd_new_array(2, sb2, NPY_FLOAT32)) ||
        !(y = rd_new_array(2, sND, NPY_FLOAT32)))
        goto done;
    if (!(ex = ws_take())) { PyErr_NoMemory(); goto done; }
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_experts_forward(ex, F32(y), U8(in[2]), F32(in[3]), F32(in[0]), F32(in[1]), F32(in[4]),
                           F32(in[5]), F32(in[6]), N, D, E, He);
    if (!s)
        s = rd_experts_backward(ex, F32(out[0]), F32(out[1]), F32(out[2]), F32(out[3]),
                                F32(out[4]), F32(out[5]), F32(in[7]), F32(in[1]), F32(in[5]),
                                N, D, E, He);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = Py_BuildValue("(NNNNNN)", out[0], out[1], out[2], out[3], out[4], out[5]);
    if (ret) memset(out, 0, sizeof out);
done:
    ws_give(ex);
    for (int i = 0; i < 6; i++) Py_XDECREF(out[i]);
    Py_XDECREF(y);
    release(in);
    return ret;
}

static PyObject *py_moe_threading(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *omode = Py_None;
    if (!PyArg_ParseTuple(args, "|O:moe_threading", &omode)) return NULL;
    const char *old = rd_get_threading() == RD_THREADS_OMP ? "omp" : "blas";
    if (omode != Py_None) {
        if (!PyUnicode_Check(omode)) {
            PyErr_Format(PyExc_TypeError, "mode: expected 'blas', 'omp' or None, got %s",
                         Py_TYPE(omode)->tp_name);
            return NULL;
        }
        const char *m = rd_str_text(omode);
        if (!m && PyErr_Occurred()) return NULL;
        if (!m || (strcmp(m, "blas") && strcmp(m, "omp"))) {
            PyErr_Format(PyExc_ValueError, "mode: expected 'blas' or 'omp', got %R", omode);
            return NULL;
        }
        rd_set_threading(strcmp(m, "omp") == 0 ? RD_THREADS_OMP : RD_THREADS_BLAS);
    }
    return PyUnicode_FromString(old);
}

static PyObject *py_blas_thread_control(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyBool_FromLong(rd_have_blas_thread_control());
}

/* Find the thread-count functions of the BLAS whose sgemm SciPy hands out (the library
 * that holds that function: OpenBLAS exports openblas_set/get_num_threads, under SciPy's
 * symbol prefix/suffix when it is scipy-openblas). Silently absent elsewhere. */
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
static void find_blas_thread_control(void) {
    PyObject *mod = PyImport_ImportModule("scipy.linalg.cython_blas"), *capi = NULL;
    if (mod) capi = PyObject_GetAttrString(mod, "__pyx_capi__");
    PyObject *cap = capi ? PyDict_GetItemString(capi, "sgemm") : NULL;
    void *fn = cap && PyCapsule_CheckExact(cap) ? PyCapsule_GetPointer(cap, PyCapsule_GetName(cap)) : NULL;
    PyErr_Clear();
    Py_XDECREF(capi);
    Py_XDECREF(mod);
    Dl_info info;
    if (!fn || !dladdr(fn, &info) || !info.dli_fname) return;
    void *lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!lib) return;
    static const char *const names[][2] = {
        {"scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"},
        {"scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"},
        {"openblas_set_num_threads", "openblas_get_num_threads"},
        {"openblas_set_num_threads64_", "openblas_get_num_threads64_"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        void *set = dlsym(lib, names[i][0]), *get = dlsym(lib, names[i][1]);
        if (set && get) {
            rd_set_blas_thread_control((rd_blas_set_threads_fn)set, (rd_blas_get_threads_fn)get);
            break;
        }
    }
    dlclose(lib); /* RTLD_NOLOAD took a reference; SciPy keeps the library loaded */
}
#else
static void find_blas_thread_control(void) {}
#endif

/* ---- the layer state -------------------------------------------------------- */

#define MOE_CAPSULE "racedit._C.moe_state"

typedef struct {
    rd_moe_state *st;
    rd_moe_cfg cfg;
    rd_busy busy;  /* a call works on this state (rd_take) */
    PyObject *x;   /* the input of the last forward, what moe_backward differentiates at */
} moe_holder;

static void moe_capsule_free(PyObject *cap) {
    moe_holder *hd = (moe_holder *)PyCapsule_GetPointer(cap, MOE_CAPSULE);
    if (!hd) { PyErr_Clear(); return; }
    rd_moe_state_free(hd->st);
    Py_XDECREF(hd->x);
    PyMem_Free(hd);
}

static moe_holder *get_holder(PyObject *cap) {
    return (moe_holder *)rd_capsule_ptr(cap, MOE_CAPSULE, "state", "a capsule from racedit._C.moe_new()");
}

/* The holder claimed for this call (give it back with rd_give(&hd->busy)), or NULL with
 * the exception: every function that reads or writes the state takes it first. */
static moe_holder *take_holder(PyObject *cap) {
    moe_holder *hd = get_holder(cap);
    if (hd && rd_take(&hd->busy, "state") < 0) return NULL;
    return hd;
}

/* fn(hd, arg) with the state of `cap` claimed for the call. */
static PyObject *with_holder(PyObject *cap, PyObject *(*fn)(moe_holder *, const void *),
                             const void *arg) {
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    PyObject *ret = fn(hd, arg);
    rd_give(&hd->busy);
    return ret;
}

/* Set the configuration fields named in `kw` (dim, num_experts, hidden, k, strategy,
 * gating, beta, eval_topk, plr_dim, sim_weight, balance_weight, plr_weight), then check
 * the whole; `c` is left unchanged on failure. */
static int cfg_update(rd_moe_cfg *c, PyObject *kw) {
    rd_moe_cfg n = *c;
    PyObject *key, *val;
    Py_ssize_t pos = 0;
    while (kw && PyDict_Next(kw, &pos, &key, &val)) {
        const char *k = rd_str_text(key);
        if (!k) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "unknown MoE setting %R", key);
            return -1;
        }
        int64_t *iv = !strcmp(k, "dim") ? &n.D : !strcmp(k, "num_experts") ? &n.E
                    : !strcmp(k, "hidden") ? &n.He : !strcmp(k, "k") ? &n.k
                    : !strcmp(k, "plr_dim") ? &n.plr_dim : NULL;
        float *fv = !strcmp(k, "beta") ? &n.beta : !strcmp(k, "sim_weight") ? &n.sim_weight
                  : !strcmp(k, "balance_weight") ? &n.balance_weight
                  : !strcmp(k, "plr_weight") ? &n.plr_weight : NULL;
        if (iv) {
            if (!PyLong_Check(val) || PyBool_Check(val)) {
                PyErr_Format(PyExc_TypeError, "%s: expected an int, got %s", k, Py_TYPE(val)->tp_name);
                return -1;
            }
            long long v = PyLong_AsLongLong(val);
            if (v == -1 && PyErr_Occurred()) return -1;
            *iv = v;
        } else if (fv) {
            double v = PyFloat_AsDouble(val);
            if (v == -1.0 && PyErr_Occurred()) return -1;
            if (!isfinite(v)) { PyErr_Format(PyExc_ValueError, "%s: expected a finite number, got %R", k, val); return -1; }
            *fv = (float)v;
        } else if (!strcmp(k, "strategy")) {
            if (rd_parse_strategy(val, "strategy", &n.strategy) < 0) return -1;
        } else if (!strcmp(k, "gating")) {
            if (rd_parse_gating(val, "gating", &n.gating) < 0) return -1;
        } else if (!strcmp(k, "eval_topk")) {
            int b = PyObject_IsTrue(val);
            if (b < 0) return -1;
            n.eval_topk = b;
        } else {
            PyErr_Format(PyExc_TypeError, "unknown MoE setting %R", key);
            return -1;
        }
    }
    rd_status s = rd_moe_cfg_check(&n);
    if (s) { rd_raise(s); return -1; }
    *c = n;
    return 0;
}

static PyObject *py_moe_new(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "moe_new: settings are keyword-only");
        return NULL;
    }
    rd_moe_cfg c = {0};
    c.strategy = RD_ROUTE_RACE;
    c.gating = RD_GATE_IDENTITY;
    c.beta = 0.99f;
    if (cfg_update(&c, kw) < 0) return NULL;
    moe_holder *hd = (moe_holder *)PyMem_Calloc(1, sizeof *hd);
    if (!hd) return PyErr_NoMemory();
    hd->cfg = c;
    if (!(hd->st = rd_moe_state_new())) { PyMem_Free(hd); return PyErr_NoMemory(); }
    PyObject *cap = PyCapsule_New(hd, MOE_CAPSULE, moe_capsule_free);
    if (!cap) { rd_moe_state_free(hd->st); PyMem_Free(hd); }
    return cap;
}

static PyObject *moe_configure(moe_holder *hd, const void *kw) {
    rd_moe_cfg c = hd->cfg;
    if (cfg_update(&c, (PyObject *)kw) < 0) return NULL;
    if (c.D != hd->cfg.D || c.E != hd->cfg.E || c.He != hd->cfg.He || c.plr_dim != hd->cfg.plr_dim) {
        PyErr_SetString(PyExc_ValueError, "moe_configure: dim, num_experts, hidden and plr_dim "
                        "are fixed when the state is made");
        return NULL;
    }
    hd->cfg = c;
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:s,s:s,s:d,s:O,s:d,s:d,s:d}",
                         "dim", (long long)c.D, "num_experts", (long long)c.E, "hidden",
                         (long long)c.He, "k", (long long)c.k, "plr_dim", (long long)c.plr_dim,
                         "strategy", rd_strategy_name(c.strategy), "gating", rd_gating_name(c.gating),
                         "beta", (double)c.beta, "eval_topk", c.eval_topk ? Py_True : Py_False,
                         "sim_weight", (double)c.sim_weight, "balance_weight",
                         (double)c.balance_weight, "plr_weight", (double)c.plr_weight);
}

/* The settings are read by a forward running with the GIL released: changed only while
 * the state is held. */
static PyObject *py_moe_configure(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O:moe_configure", &cap)) return NULL;
    return with_holder(cap, moe_configure, kw);
}

static PyObject *py_moe_param_sizes(PyObject *self, PyObject *cap) {
    (void)self;
    moe_holder *hd = get_holder(cap);
    if (!hd) return NULL;
    int64_t sz[RD_MOE_NPARAM];
    rd_moe_param_sizes(sz, &hd->cfg);
    PyObject *t = PyTuple_New(RD_MOE_NPARAM);
    for (int i = 0; t && i < RD_MOE_NPARAM; i++) {
        PyObject *v = PyLong_FromLongLong(sz[i]);
        if (!v) { Py_CLEAR(t); break; }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static int64_t total_params(const rd_moe_cfg *c) {
    int64_t sz[RD_MOE_NPARAM];
    return rd_moe_param_sizes(sz, c);
}

static PyObject *py_moe_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"state", "x", "params", "training", "plr_target", NULL};
    PyObject *cap, *ox, *op, *ot = Py_None, *ret = NULL;
    int training = 1;
    PyArrayObject *in[NIN] = {0}, *y = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pO:moe_forward", kws, &cap, &ox, &op, &training,
                                     &ot))
        return NULL;
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    npy_intp sx[3] = {RD_ANY, RD_ANY, hd->cfg.D}, sp[1] = {total_params(&hd->cfg)};
    if (!(in[0] = rd_in_array(ox, "x", NPY_FLOAT32, 3, sx))) goto done;
    if (!(in[1] = rd_in_array(op, "params", NPY_FLOAT32, 1, sp))) goto done;
    npy_intp B = PyArray_DIM(in[0], 0), L = PyArray_DIM(in[0], 1);
    if (B < 1 || L < 1) {
        PyErr_Format(PyExc_ValueError, "x: expected B, L >= 1, got shape (%zd, %zd, %zd)", B, L,
                     (npy_intp)hd->cfg.D);
        goto done;
    }
    if (ot != Py_None) {  /* the PLR head's target (B,L,plr_dim) */
        if (hd->cfg.plr_dim == 0) {
            PyErr_SetString(PyExc_ValueError, "plr_target: given, but the layer has no PLR head (plr_dim=0)");
            goto done;
        }
        npy_intp st3[3] = {B, L, hd->cfg.plr_dim};
        if (!(in[2] = rd_in_array(ot, "plr_target", NPY_FLOAT32, 3, st3))) goto done;
    }
    if (!(y = rd_new_array(3, PyArray_DIMS(in[0]), NPY_FLOAT32))) goto done;
    rd_moe_params p;
    rd_moe_params_point(&p, F32(in[1]), &hd->cfg);
    const float *target = in[2] ? F32(in[2]) : NULL;
    rd_status s;
    Py_CLEAR(hd->x);
    Py_BEGIN_ALLOW_THREADS
    s = rd_moe_forward(hd->st, F32(y), F32(in[0]), &hd->cfg, &p, B, L, training, target);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    hd->x = Py_NewRef((PyObject *)in[0]);
    ret = (PyObject *)y; y = NULL;
done:
    Py_XDECREF(y);
    release(in);
    rd_give(&hd->busy);
    return ret;
}

static PyObject *py_moe_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"state", "dy", "x", "params", "grads", NULL};
    PyObject *cap, *ody, *ox, *op, *og, *ret = NULL;
    PyArrayObject *in[NIN] = {0}, *dx = NULL, *grads;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:moe_backward", kws, &cap, &ody, &ox, &op, &og))
        return NULL;
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    rd_moe_view v;
    rd_moe_state_view(hd->st, &v);
    if (!v.have_forward || (ox == Py_None && !hd->x)) {
        PyErr_SetString(PyExc_RuntimeError, "moe_backward: no forward to differentiate (call forward first)");
        goto done;
    }
    npy_intp sx[3] = {v.B, v.L, hd->cfg.D}, sp[1] = {total_params(&hd->cfg)};
    if (!(in[0] = rd_in_array(ody, "dy", NPY_FLOAT32, 3, sx))) goto done;
    if (!(in[1] = rd_in_array(ox == Py_None ? hd->x : ox, "x", NPY_FLOAT32, 3, sx))) goto done;
    if (!(in[2] = rd_in_array(op, "params", NPY_FLOAT32, 1, sp))) goto done;
    if (!(grads = rd_out_array(og, "grads", NPY_FLOAT32, 1, sp))) goto done;
    if (rd_check_disjoint(grads, "grads", in, 3, (const char *[]){"dy", "x", "params"}) < 0)
        goto done;
    if (!(dx = rd_new_array(3, sx, NPY_FLOAT32))) goto done;
    rd_moe_params p, g;
    rd_moe_params_point(&p, F32(in[2]), &hd->cfg);
    rd_moe_params_point(&g, F32(grads), &hd->cfg);
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_moe_backward(hd->st, F32(dx), &g, F32(in[0]), F32(in[1]), &hd->cfg, &p);
    Py_END_ALLOW_THREADS
    if (s) { rd_raise(s); goto done; }
    ret = (PyObject *)dx; dx = NULL;
done:
    Py_XDECREF(dx);
    release(in);
    rd_give(&hd->busy);
    return ret;
}

/* A copy of a state buffer as a new array of `ndim` dims `shape`. */
static PyObject *copy_out(const void *src, int ndim, npy_intp *shape, int typenum, size_t elsize) {
    PyArrayObject *a = rd_new_array(ndim, shape, typenum);
    if (!a) return NULL;
    memcpy(PyArray_DATA(a), src, (size_t)PyArray_SIZE(a) * elsize);
    return (PyObject *)a;
}

static PyObject *moe_get(moe_holder *hd, const void *arg) {
    const char *name = arg;
    rd_moe_view v;
    rd_moe_state_view(hd->st, &v);
    if (!strcmp(name, "threshold")) return v.have_tau ? PyFloat_FromDouble(v.tau) : Py_NewRef(Py_None);
    if (!strcmp(name, "aux")) return rd_moe_aux_dict(hd->st, &hd->cfg);
    int known = !strcmp(name, "batch_threshold") || !strcmp(name, "mask") ||
                !strcmp(name, "gates") || !strcmp(name, "logits") || !strcmp(name, "hidden") ||
                !strcmp(name, "counts") || !strcmp(name, "pairs");
    if (!known) {
        PyErr_Format(PyExc_ValueError, "name: expected one of threshold, batch_threshold, mask, "
                     "gates, logits, hidden, counts, pairs, aux; got '%s'", name);
        return NULL;
    }
    if (!v.have_forward) Py_RETURN_NONE;
    npy_intp sE3[3] = {v.B, v.L, v.E}, sD3[3] = {v.B, v.L, v.D}, sE[1] = {v.E};
    if (!strcmp(name, "batch_threshold")) return PyFloat_FromDouble(v.tau_b);
    if (!strcmp(name, "mask")) return copy_out(v.mask, 3, sE3, NPY_BOOL, 1);
    if (!strcmp(name, "gates")) return copy_out(v.G, 3, sE3, NPY_FLOAT32, sizeof(float));
    if (!strcmp(name, "logits")) return copy_out(v.R, 3, sE3, NPY_FLOAT32, sizeof(float));
    if (!strcmp(name, "hidden")) return copy_out(v.h, 3, sD3, NPY_FLOAT32, sizeof(float));
    if (!strcmp(name, "counts")) return copy_out(v.counts, 1, sE, NPY_INT64, sizeof(int64_t));
    return PyLong_FromLongLong(v.P);
}

/* Held while copying out: a forward of another thread could otherwise regrow the buffers
 * under the copy (allocating the copy may release the GIL). */
static PyObject *py_moe_get(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    const char *name;
    if (!PyArg_ParseTuple(args, "Os:moe_get", &cap, &name)) return NULL;
    return with_holder(cap, moe_get, name);
}

static PyObject *moe_set_threshold(moe_holder *hd, const void *arg) {
    PyObject *otau = (PyObject *)arg;
    rd_status s;
    if (otau == Py_None) {
        s = rd_moe_set_threshold(hd->st, NULL);
    } else {
        double d = PyFloat_AsDouble(otau);
        if (d == -1.0 && PyErr_Occurred()) return NULL;
        if (isnan(d)) {
            PyErr_SetString(PyExc_ValueError, "threshold: expected a number or None, got nan");
            return NULL;
        }
        float f = (float)d;
        s = rd_moe_set_threshold(hd->st, &f);
    }
    if (s) return rd_raise(s);
    Py_RETURN_NONE;
}

static PyObject *py_moe_set_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *otau;
    if (!PyArg_ParseTuple(args, "OO:moe_set_threshold", &cap, &otau)) return NULL;
    return with_holder(cap, moe_set_threshold, otau);
}

static PyMethodDef moe_methods[] = {
    {"gate_forward", (PyCFunction)(void (*)(void))py_gate_forward, METH_VARARGS | METH_KEYWORDS,
     "gate_forward(R, gating='identity') -> G (N,E) float32."},
    {"gate_backward", (PyCFunction)(void (*)(void))py_gate_backward, METH_VARARGS | METH_KEYWORDS,
     "gate_backward(dG, G, gating='identity') -> dR (N,E) float32."},
    {"router_forward", (PyCFunction)(void (*)(void))py_router_forward, METH_VARARGS | METH_KEYWORDS,
     "router_forward(x, Wr, br, Wg, bg) -> (hpre, h, R)."},
    {"router_backward", (PyCFunction)(void (*)(void))py_router_backward, METH_VARARGS | METH_KEYWORDS,
     "router_backward(dR, hpre, h, x, Wr, Wg, dh_extra=None) -> (dx, dWr, dbr, dWg, dbg)."},
    {"experts_forward", (PyCFunction)(void (*)(void))py_experts_forward, METH_VARARGS | METH_KEYWORDS,
     "experts_forward(x, mask, G, w1, b1, w2, b2) -> y (N,D)."},
    {"experts_backward", (PyCFunction)(void (*)(void))py_experts_backward, METH_VARARGS | METH_KEYWORDS,
     "experts_backward(dy, x, mask, G, w1, b1, w2, b2) -> (dx, dG, dw1, db1, dw2, db2)."},
    {"moe_threading", py_moe_threading, METH_VARARGS,
     "moe_threading(mode=None) -> previous mode, 'blas' or 'omp'."},
    {"blas_thread_control", py_blas_thread_control, METH_NOARGS,
     "True when racedit can set the BLAS thread count (for the 'omp' threading mode)."},
    {"moe_new", (PyCFunction)(void (*)(void))py_moe_new, METH_VARARGS | METH_KEYWORDS,
     "moe_new(**settings) -> state capsule."},
    {"moe_configure", (PyCFunction)(void (*)(void))py_moe_configure, METH_VARARGS | METH_KEYWORDS,
     "moe_configure(state, **settings) -> dict of all settings."},
    {"moe_param_sizes", py_moe_param_sizes, METH_O, "moe_param_sizes(state) -> sizes of the parameters."},
    {"moe_forward", (PyCFunction)(void (*)(void))py_moe_forward, METH_VARARGS | METH_KEYWORDS,
     "moe_forward(state, x, params, training=True, plr_target=None) -> y (B,L,D)."},
    {"moe_backward", (PyCFunction)(void (*)(void))py_moe_backward, METH_VARARGS | METH_KEYWORDS,
     "moe_backward(state, dy, x, params, grads) -> dx (B,L,D); grads accumulate. x=None: the "
     "last forward's own input (which the state keeps)."},
    {"moe_get", py_moe_get, METH_VARARGS, "moe_get(state, name) -> a copy of what the last forward left."},
    {"moe_set_threshold", py_moe_set_threshold, METH_VARARGS, "moe_set_threshold(state, tau or None)."},
    {NULL, NULL, 0, NULL}};

int rd_bind_moe(PyObject *m) {
    find_blas_thread_control();
    rd_set_threading(rd_have_blas_thread_control() ? RD_THREADS_OMP : RD_THREADS_BLAS);
    return PyModule_AddFunctions(m, moe_methods);
}
