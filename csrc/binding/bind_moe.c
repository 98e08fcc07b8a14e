/* bind_moe.c — Python functions of the MoE block: the ops (gate, router, experts) on
 * NumPy arrays on any device, and the per-layer state behind racedit.MoE (a PyCapsule
 * owning a backend MoE state, its rd_moe_cfg and the last forward's input). Parameters and
 * gradients are host arrays on every device: a device layer gets them staged (copied in,
 * gradients copied back) on each call. Every argument is validated here; the GIL is
 * released around the ops only. */
#include "bind.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#define F32 NPY_FLOAT32
#define DV(a) RD_DEV(c, a)
#define KW (PyCFunction)(void (*)(void))

/* ---- gating ---------------------------------------------------------------- */

/* gate_forward(R, gating) / gate_backward(dG, G, gating): G (N,E) or dR (N,E). */
static PyObject *gate_op(PyObject *args, PyObject *kw, int backward) {
    static char *kf[] = {"R", "gating", "device", NULL}, *kb[] = {"dG", "G", "gating", "device", NULL};
    PyObject *o0, *o1 = NULL, *og = NULL, *odev = NULL, *ret = NULL;
    PyArrayObject *a, *b = NULL, *out;
    const rd_backend *be;
    rd_gating g = RD_GATE_IDENTITY;
    rd_call c = {0};
    int ok = backward ? PyArg_ParseTupleAndKeywords(args, kw, "OO|O$O:gate_backward", kb, &o0, &o1,
                                                    &og, &odev)
                      : PyArg_ParseTupleAndKeywords(args, kw, "O|O$O:gate_forward", kf, &o0, &og,
                                                    &odev);
    if (!ok || rd_parse_device(odev, &be) < 0 || (og && rd_parse_gating(og, "gating", &g) < 0))
        return NULL;
    const char *name = backward ? "G" : "R";
    if (!(a = rd_call_in(&c, backward ? o1 : o0, name, F32, 2, NULL))) goto done;
    npy_intp N = PyArray_DIM(a, 0), E = PyArray_DIM(a, 1);
    if (E < 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected E >= 1 columns, got shape (%zd, %zd)", name, N, E);
        goto done;
    }
    if (backward) RD_IN(c, b, o0, "dG", F32, 2, N, E);
    RD_NEW(c, out, F32, 2, N, E);
    RD_CALL_RUN(c, be, backward ? be->gate_backward(DV(out), DV(b), DV(a), N, E, g)
                                : be->gate_forward(DV(out), DV(a), N, E, g));
    ret = Py_NewRef((PyObject *)out);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_gate_forward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return gate_op(a, k, 0); }
static PyObject *py_gate_backward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return gate_op(a, k, 1); }

/* ---- router ---------------------------------------------------------------- */

/* x (N,D), Wr (D,D), br (D), Wg (D,E), bg (E): converts into in[0..4]; sets N, D, E. */
static int router_inputs(rd_call *c, PyArrayObject **in, PyObject *ox, PyObject *oWr,
                         PyObject *obr, PyObject *oWg, PyObject *obg, npy_intp *N, npy_intp *D,
                         npy_intp *E) {
    if (!(in[0] = rd_call_in(c, ox, "x", F32, 2, NULL))) return -1;
    *N = PyArray_DIM(in[0], 0);
    *D = PyArray_DIM(in[0], 1);
    if (*D < 1) { PyErr_SetString(PyExc_ValueError, "x: expected D >= 1 columns, got 0"); return -1; }
    npy_intp sWr[2] = {*D, *D}, sbr[1] = {*D}, sWg[2] = {*D, RD_ANY};
    if (!(in[1] = rd_call_in(c, oWr, "Wr", F32, 2, sWr))) return -1;
    if (obr && !(in[2] = rd_call_in(c, obr, "br", F32, 1, sbr))) return -1;
    if (!(in[3] = rd_call_in(c, oWg, "Wg", F32, 2, sWg))) return -1;
    *E = PyArray_DIM(in[3], 1);
    if (*E < 1) { PyErr_SetString(PyExc_ValueError, "Wg: expected E >= 1 columns, got 0"); return -1; }
    npy_intp sbg[1] = {*E};
    if (obg && !(in[4] = rd_call_in(c, obg, "bg", F32, 1, sbg))) return -1;
    return 0;
}

static PyObject *py_router_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"x", "Wr", "br", "Wg", "bg", "device", NULL};
    PyObject *ox, *oWr, *obr, *oWg, *obg, *odev = NULL, *ret = NULL;
    PyArrayObject *in[5] = {0}, *hpre, *h, *R;
    const rd_backend *be;
    rd_call c = {0};
    npy_intp N, D, E;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|$O:router_forward", kws, &ox, &oWr, &obr,
                                     &oWg, &obg, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    if (router_inputs(&c, in, ox, oWr, obr, oWg, obg, &N, &D, &E) < 0) goto done;
    RD_NEW(c, hpre, F32, 2, N, D);
    RD_NEW(c, h, F32, 2, N, D);
    RD_NEW(c, R, F32, 2, N, E);
    RD_CALL_RUN(c, be, be->router_forward(DV(hpre), DV(h), DV(R), DV(in[0]), DV(in[1]), DV(in[2]),
                                          DV(in[3]), DV(in[4]), N, D, E));
    ret = PyTuple_Pack(3, hpre, h, R);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_router_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dR", "hpre", "h", "x", "Wr", "Wg", "dh_extra", "device", NULL};
    PyObject *odR, *ohpre, *oh, *ox, *oWr, *oWg, *oextra = Py_None, *odev = NULL, *ret = NULL;
    PyArrayObject *in[5] = {0}, *dR, *hpre, *h, *extra = NULL, *g[6];
    const rd_backend *be;
    rd_call c = {0};
    npy_intp N, D, E;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOO|O$O:router_backward", kws, &odR, &ohpre,
                                     &oh, &ox, &oWr, &oWg, &oextra, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    if (router_inputs(&c, in, ox, oWr, NULL, oWg, NULL, &N, &D, &E) < 0) goto done;
    RD_IN(c, dR, odR, "dR", F32, 2, N, E);
    RD_IN(c, hpre, ohpre, "hpre", F32, 2, N, D);
    RD_IN(c, h, oh, "h", F32, 2, N, D);
    if (oextra != Py_None) RD_IN(c, extra, oextra, "dh_extra", F32, 2, N, D);
    /* dx, dWr, dbr, dWg, dbg, then scratch (N,D); they start at zero: the parameter grads
     * accumulate, dx too */
    RD_NEW(c, g[0], F32, 2, N, D);
    RD_NEW(c, g[1], F32, 2, D, D);
    RD_NEW(c, g[2], F32, 1, D);
    RD_NEW(c, g[3], F32, 2, D, E);
    RD_NEW(c, g[4], F32, 1, E);
    RD_NEW(c, g[5], F32, 2, N, D);
    RD_CALL_RUN(c, be, be->router_backward(DV(g[0]), DV(g[1]), DV(g[2]), DV(g[3]), DV(g[4]),
                                           DV(g[5]), DV(dR), DV(extra), DV(hpre), DV(h), DV(in[0]),
                                           DV(in[1]), DV(in[3]), N, D, E));
    ret = PyTuple_Pack(5, g[0], g[1], g[2], g[3], g[4]);
done:
    rd_call_end(&c);
    return ret;
}

/* ---- experts --------------------------------------------------------------- */

/* x (N,D), mask (N,E) bool, G (N,E), w1 (E,D,He), b1 (E,He), w2 (E,He,D), b2 (E,D). */
static int expert_inputs(rd_call *c, PyArrayObject **in, PyObject **o, npy_intp *N, npy_intp *D,
                         npy_intp *E, npy_intp *He) {
    if (!(in[0] = rd_call_in(c, o[0], "x", F32, 2, NULL))) return -1;
    *N = PyArray_DIM(in[0], 0);
    *D = PyArray_DIM(in[0], 1);
    npy_intp sw1[3] = {RD_ANY, *D, RD_ANY};
    if (!(in[3] = rd_call_in(c, o[3], "w1", F32, 3, sw1))) return -1;
    *E = PyArray_DIM(in[3], 0);
    *He = PyArray_DIM(in[3], 2);
    if (*D < 1 || *E < 1 || *He < 1) {
        PyErr_Format(PyExc_ValueError, "w1: expected shape (E, D, He) with D, E, He >= 1, got "
                     "D=%zd (from x) E=%zd He=%zd", *D, *E, *He);
        return -1;
    }
    npy_intp sNE[2] = {*N, *E}, sb1[2] = {*E, *He}, sw2[3] = {*E, *He, *D}, sb2[2] = {*E, *D};
    if (!(in[1] = rd_call_in(c, o[1], "mask", NPY_BOOL, 2, sNE))) return -1;
    if (!(in[2] = rd_call_in(c, o[2], "G", F32, 2, sNE))) return -1;
    if (!(in[4] = rd_call_in(c, o[4], "b1", F32, 2, sb1))) return -1;
    if (!(in[5] = rd_call_in(c, o[5], "w2", F32, 3, sw2))) return -1;
    if (!(in[6] = rd_call_in(c, o[6], "b2", F32, 2, sb2))) return -1;
    return 0;
}

/* The forward into g[0] and, with backward, the backward into g[1..6] (in: the inputs,
 * in[7] dy), on the staged arrays of `c`. */
static rd_status experts_run(const rd_backend *be, const rd_call *c, int backward,
                             PyArrayObject **g_, PyArrayObject **in, int64_t N, int64_t D,
                             int64_t E, int64_t He) {
    void *d[8], *g[7];
    for (int i = 0; i < 8; i++) d[i] = rd_call_dev(c, in[i]);
    for (int i = 0; i < 7; i++) g[i] = rd_call_dev(c, g_[i]);
    void *ex = c->free_arg;
    rd_status s = be->experts_forward(ex, g[0], d[1], d[2], d[0], d[3], d[4], d[5], d[6], N, D,
                                      E, He);
    if (s || !backward) return s;
    return be->experts_backward(ex, g[1], g[2], g[3], g[4], g[5], g[6], d[7], d[3], d[5], N, D,
                                E, He);
}

/* experts_forward(x, mask, G, w1, b1, w2, b2) -> y; experts_backward(dy, x, ...) -> (dx,
 * dG, dw1, db1, dw2, db2), the forward recomputed first. precision of the GEMMs. */
static PyObject *experts_op(PyObject *args, PyObject *kw, int backward) {
    static char *kf[] = {"x", "mask", "G", "w1", "b1", "w2", "b2", "precision", "device", NULL};
    static char *kb[] = {"dy", "x", "mask", "G", "w1", "b1", "w2", "b2", "precision", "device", NULL};
    PyObject *o[8], *oprec = NULL, *odev = NULL, *ret = NULL;
    PyArrayObject *in[8] = {0}, *out[7] = {0};
    const rd_backend *be;
    rd_call c = {0};
    int prec;
    npy_intp N, D, E, He;
    int ok = backward ? PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOOO|O$O:experts_backward", kb,
                                                    &o[7], &o[0], &o[1], &o[2], &o[3], &o[4],
                                                    &o[5], &o[6], &oprec, &odev)
                      : PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO|O$O:experts_forward", kf,
                                                    &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                                                    &o[6], &oprec, &odev);
    if (!ok || rd_parse_device(odev, &be) < 0 || rd_parse_precision(oprec, "precision", &prec) < 0)
        return NULL;
    if (expert_inputs(&c, in, o, &N, &D, &E, &He) < 0) goto done;
    if (backward) RD_IN(c, in[7], o[7], "dy", F32, 2, N, D);
    /* y, then (backward) dx like x, dG like G, the parameter grads like the parameters */
    RD_NEW(c, out[0], F32, 2, N, D);
    for (int i = 1; backward && i < 7; i++) {
        PyArrayObject *like = in[i == 1 ? 0 : i];
        if (!(out[i] = rd_call_new(&c, PyArray_NDIM(like), PyArray_DIMS(like), F32))) goto done;
    }
    c.free_fn = be->experts_free;
    RD_CHECK(be->experts_new(&c.free_arg));
    RD_CHECK(be->experts_set_precision(c.free_arg, prec));
    RD_CALL_RUN(c, be, experts_run(be, &c, backward, out, in, N, D, E, He));
    ret = backward ? PyTuple_Pack(6, out[1], out[2], out[3], out[4], out[5], out[6])
                   : Py_NewRef((PyObject *)out[0]);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_experts_forward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return experts_op(a, k, 0); }
static PyObject *py_experts_backward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return experts_op(a, k, 1); }

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
    void *fn = rd_scipy_sgemm();
    PyErr_Clear();
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
    const rd_backend *be;
    void *st;      /* the backend's layer state */
    rd_moe_cfg cfg;
    int prec;      /* of the expert GEMMs */
    rd_busy busy;  /* a call works on this state (rd_take) */
    PyObject *x;   /* the input of the last forward, what moe_backward differentiates at */
} moe_holder;

static void moe_capsule_free(PyObject *cap) {
    moe_holder *hd = (moe_holder *)PyCapsule_GetPointer(cap, MOE_CAPSULE);
    if (!hd) { PyErr_Clear(); return; }
    if (hd->st) hd->be->moe_free(hd->st);
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

/* moe_new(device='cpu', precision='fp32', **settings) -> state capsule. */
static PyObject *py_moe_new(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    if (PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "moe_new: settings are keyword-only");
        return NULL;
    }
    PyObject *odev, *oprec, *cap = NULL, *settings = rd_split_settings(kw, &odev, &oprec);
    if (!settings) return NULL;
    const rd_backend *be;
    rd_moe_cfg c = {0};
    c.strategy = RD_ROUTE_RACE;
    c.gating = RD_GATE_IDENTITY;
    c.beta = 0.99f;
    c.plr_weight = 1.0f;
    int prec;
    moe_holder *hd = NULL;
    if (rd_parse_device(odev, &be) < 0 || rd_parse_precision(oprec, "precision", &prec) < 0 ||
        rd_parse_moe_settings(settings, &c, 1) < 0 || rd_device_ready(be) < 0)
        goto done;
    if (!(hd = (moe_holder *)PyMem_Calloc(1, sizeof *hd))) { PyErr_NoMemory(); goto done; }
    hd->be = be, hd->cfg = c, hd->prec = prec;
    rd_status st = be->moe_new(&hd->st);
    if (!st) st = be->moe_set_precision(hd->st, prec);
    if (st) { rd_raise(st); goto done; }
    if ((cap = PyCapsule_New(hd, MOE_CAPSULE, moe_capsule_free))) hd = NULL;
done:
    if (hd) {
        if (hd->st) be->moe_free(hd->st);
        PyMem_Free(hd);
    }
    Py_DECREF(settings);
    return cap;
}

static PyObject *moe_configure(moe_holder *hd, const void *kw) {
    rd_moe_cfg c = hd->cfg;
    if (rd_parse_moe_settings((PyObject *)kw, &c, 1) < 0) return NULL;
    if (c.D != hd->cfg.D || c.E != hd->cfg.E || c.He != hd->cfg.He || c.plr_dim != hd->cfg.plr_dim) {
        PyErr_SetString(PyExc_ValueError, "moe_configure: dim, num_experts, expert_hidden and "
                        "plr_dim are fixed when the state is made");
        return NULL;
    }
    hd->cfg = c;
    return rd_moe_settings_dict(&c);
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

/* moe_forward(state, x, params, training=True, plr_target=None) -> y (B,L,D). */
static PyObject *py_moe_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"state", "x", "params", "training", "plr_target", NULL};
    PyObject *cap, *ox, *op, *ot = Py_None, *ret = NULL;
    int training = 1;
    PyArrayObject *x, *params, *target = NULL, *y;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|pO:moe_forward", kws, &cap, &ox, &op, &training,
                                     &ot))
        return NULL;
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    c.busy = &hd->busy;
    const rd_backend *be = hd->be;
    RD_IN(c, x, ox, "x", F32, 3, RD_ANY, RD_ANY, hd->cfg.D);
    RD_IN(c, params, op, "params", F32, 1, total_params(&hd->cfg));
    npy_intp B = PyArray_DIM(x, 0), L = PyArray_DIM(x, 1);
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
        RD_IN(c, target, ot, "plr_target", F32, 3, B, L, hd->cfg.plr_dim);
    }
    RD_NEW(c, y, F32, 3, B, L, hd->cfg.D);
    if (rd_call_stage(&c, be) < 0) goto done;
    Py_CLEAR(hd->x);
    rd_moe_params p;
    rd_moe_params_point(&p, DV(params), &hd->cfg);
    RD_CALL_EXEC(c, be->moe_forward(hd->st, DV(y), DV(x), &hd->cfg, &p, B, L, training,
                                        DV(target)));
    hd->x = Py_NewRef((PyObject *)x);
    ret = Py_NewRef((PyObject *)y);
done:
    rd_call_end(&c);
    return ret;
}

/* moe_backward(state, dy, x, params, grads) -> dx; grads accumulate in place. */
static PyObject *py_moe_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"state", "dy", "x", "params", "grads", NULL};
    PyObject *cap, *ody, *ox, *op, *og, *ret = NULL;
    PyArrayObject *in[3], *dx, *grads;
    rd_call c = {0};
    rd_moe_view v;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO:moe_backward", kws, &cap, &ody, &ox, &op, &og))
        return NULL;
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    c.busy = &hd->busy;
    const rd_backend *be = hd->be;
    RD_CHECK(be->moe_view(hd->st, &v));
    if (!v.have_forward || (ox == Py_None && !hd->x)) {
        PyErr_SetString(PyExc_RuntimeError, "moe_backward: no forward to differentiate (call forward first)");
        goto done;
    }
    RD_IN(c, in[0], ody, "dy", F32, 3, v.B, v.L, hd->cfg.D);
    RD_IN(c, in[1], ox == Py_None ? hd->x : ox, "x", F32, 3, v.B, v.L, hd->cfg.D);
    RD_IN(c, in[2], op, "params", F32, 1, total_params(&hd->cfg));
    RD_OUT(c, grads, og, "grads", F32, 1, total_params(&hd->cfg));
    if (rd_check_disjoint(grads, "grads", in, 3, (const char *[]){"dy", "x", "params"}) < 0)
        goto done;
    RD_NEW(c, dx, F32, 3, v.B, v.L, hd->cfg.D);
    if (rd_call_stage(&c, be) < 0) goto done;
    rd_moe_params p, g;
    rd_moe_params_point(&p, DV(in[2]), &hd->cfg);
    rd_moe_params_point(&g, DV(grads), &hd->cfg); /* accumulates into them */
    RD_CALL_EXEC(c, be->moe_backward(hd->st, DV(dx), &g, DV(in[0]), DV(in[1]), &hd->cfg, &p));
    ret = Py_NewRef((PyObject *)dx);
done:
    rd_call_end(&c);
    return ret;
}

/* ---- the layer on memory given by address (racedit.torch: torch tensors' data_ptr()) ----
 * The same forward / backward as moe_forward / moe_backward on memory of the state's
 * backend (device memory for CUDA, host memory for the CPU) that the caller owns and sized:
 * nothing is staged or copied, and the sizes cannot be checked here. CUDA work is queued on
 * the legacy default stream (the caller orders its own stream against it). */

/* An address argument: a non-zero int, or -1 with ValueError naming it. */
static int parse_addr(PyObject *o, const char *name, void **out) {
    unsigned long long v = PyLong_Check(o) ? PyLong_AsUnsignedLongLong(o) : 0;
    if (PyErr_Occurred() || v == 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: expected a non-zero memory address (int), got %R", name, o);
        return -1;
    }
    *out = (void *)(uintptr_t)v;
    return 0;
}

/* moe_forward_ptr(state, y, x, params, B, L, training): y (B,L,D) = the layer on x (B,L,D)
 * with the flat parameters `params`. */
static PyObject *py_moe_forward_ptr(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *o[3];
    long long B, L;
    int training;
    void *a[3];
    if (!PyArg_ParseTuple(args, "OOOOLLp:moe_forward_ptr", &cap, &o[0], &o[1], &o[2], &B, &L,
                          &training))
        return NULL;
    const char *names[3] = {"y", "x", "params"};
    for (int i = 0; i < 3; i++)
        if (parse_addr(o[i], names[i], &a[i]) < 0) return NULL;
    if (B < 1 || L < 1) {
        PyErr_Format(PyExc_ValueError, "B, L: expected >= 1, got %lld, %lld", B, L);
        return NULL;
    }
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    PyObject *ret = NULL;
    if (rd_device_ready(hd->be) == 0) {
        rd_moe_params p;
        rd_moe_params_point(&p, (float *)a[2], &hd->cfg);
        Py_CLEAR(hd->x);  /* moe_backward(x=None) has no array of this forward */
        rd_status st;
        Py_BEGIN_ALLOW_THREADS
        st = hd->be->moe_forward(hd->st, (float *)a[0], (const float *)a[1], &hd->cfg, &p, B, L,
                                 training, NULL);
        Py_END_ALLOW_THREADS
        ret = st ? rd_raise(st) : Py_NewRef(Py_None);
    }
    rd_give(&hd->busy);
    return ret;
}

/* moe_backward_ptr(state, dx, grads, dy, x, params): dx (B,L,D) given dy (B,L,D) at the
 * last forward's x; the flat parameter gradients ACCUMULATE into `grads`. */
static PyObject *py_moe_backward_ptr(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *o[5];
    void *a[5];
    if (!PyArg_ParseTuple(args, "OOOOOO:moe_backward_ptr", &cap, &o[0], &o[1], &o[2], &o[3], &o[4]))
        return NULL;
    const char *names[5] = {"dx", "grads", "dy", "x", "params"};
    for (int i = 0; i < 5; i++)
        if (parse_addr(o[i], names[i], &a[i]) < 0) return NULL;
    moe_holder *hd = take_holder(cap);
    if (!hd) return NULL;
    PyObject *ret = NULL;
    rd_moe_view v;
    rd_status s = hd->be->moe_view(hd->st, &v);
    if (s) {
        rd_raise(s);
    } else if (!v.have_forward) {
        PyErr_SetString(PyExc_RuntimeError, "moe_backward_ptr: no forward to differentiate (call forward first)");
    } else {
        rd_moe_params p, g;
        rd_moe_params_point(&p, (float *)a[4], &hd->cfg);
        rd_moe_params_point(&g, (float *)a[1], &hd->cfg);
        Py_BEGIN_ALLOW_THREADS
        s = hd->be->moe_backward(hd->st, (float *)a[0], &g, (const float *)a[2], (const float *)a[3],
                                 &hd->cfg, &p);
        Py_END_ALLOW_THREADS
        ret = s ? rd_raise(s) : Py_NewRef(Py_None);
    }
    rd_give(&hd->busy);
    return ret;
}

static PyObject *moe_get(moe_holder *hd, const void *arg) {
    return rd_moe_get(hd->be, hd->st, (const char *)arg);
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
    PyArrayObject *a;
    if (rd_parse_thresholds((PyObject *)arg, "threshold", &a) < 0) return NULL;
    rd_status s = hd->be->moe_set_threshold(hd->st, a ? (const float *)PyArray_DATA(a) : NULL,
                                            a ? (int64_t)PyArray_SIZE(a) : 0);
    Py_XDECREF(a);
    if (s) return rd_raise(s);
    Py_RETURN_NONE;
}

static PyObject *py_moe_set_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *otau;
    if (!PyArg_ParseTuple(args, "OO:moe_set_threshold", &cap, &otau)) return NULL;
    return with_holder(cap, moe_set_threshold, otau);
}

/* moe_precision(state, precision=None) -> the previous precision's name; sets it when given
 * (a change drops the last forward). */
static PyObject *moe_precision(moe_holder *hd, const void *arg) {
    static const char *const names[3] = {"fp32", "tf32", "bf16"};
    const int prev = hd->prec;
    int prec;
    if (arg && rd_parse_precision((PyObject *)arg, "precision", &prec) < 0) return NULL;
    rd_status s = arg ? hd->be->moe_set_precision(hd->st, prec) : RD_OK;
    if (s) return rd_raise(s);
    if (arg) hd->prec = prec;
    return PyUnicode_FromString(names[prev]);
}

static PyObject *py_moe_precision(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *oprec = NULL;
    if (!PyArg_ParseTuple(args, "O|O:moe_precision", &cap, &oprec)) return NULL;
    return with_holder(cap, moe_precision, oprec == Py_None ? NULL : oprec);
}

static PyObject *py_moe_device(PyObject *self, PyObject *cap) {
    (void)self;
    moe_holder *hd = get_holder(cap);
    return hd ? PyUnicode_FromString(hd->be->name) : NULL;
}

static PyMethodDef moe_methods[] = {
    {"gate_forward", KW py_gate_forward, METH_VARARGS | METH_KEYWORDS,
     "gate_forward(R, gating='identity', device='cpu') -> G (N,E) float32."},
    {"gate_backward", KW py_gate_backward, METH_VARARGS | METH_KEYWORDS,
     "gate_backward(dG, G, gating='identity', device='cpu') -> dR (N,E) float32."},
    {"router_forward", KW py_router_forward, METH_VARARGS | METH_KEYWORDS,
     "router_forward(x, Wr, br, Wg, bg, device='cpu') -> (hpre, h, R)."},
    {"router_backward", KW py_router_backward, METH_VARARGS | METH_KEYWORDS,
     "router_backward(dR, hpre, h, x, Wr, Wg, dh_extra=None, device='cpu') -> (dx, dWr, dbr, dWg, dbg)."},
    {"experts_forward", KW py_experts_forward, METH_VARARGS | METH_KEYWORDS,
     "experts_forward(x, mask, G, w1, b1, w2, b2, precision='fp32', device='cpu') -> y (N,D)."},
    {"experts_backward", KW py_experts_backward, METH_VARARGS | METH_KEYWORDS,
     "experts_backward(dy, x, mask, G, w1, b1, w2, b2, precision='fp32', device='cpu') -> "
     "(dx, dG, dw1, db1, dw2, db2)."},
    {"moe_threading", py_moe_threading, METH_VARARGS,
     "moe_threading(mode=None) -> previous mode, 'blas' or 'omp'."},
    {"blas_thread_control", py_blas_thread_control, METH_NOARGS,
     "True when racedit can set the BLAS thread count (for the 'omp' threading mode)."},
    {"moe_new", KW py_moe_new, METH_VARARGS | METH_KEYWORDS,
     "moe_new(device='cpu', precision='fp32', **settings) -> state capsule."},
    {"moe_configure", KW py_moe_configure, METH_VARARGS | METH_KEYWORDS,
     "moe_configure(state, **settings) -> dict of all settings."},
    {"moe_param_sizes", py_moe_param_sizes, METH_O, "moe_param_sizes(state) -> sizes of the parameters."},
    {"moe_forward", KW py_moe_forward, METH_VARARGS | METH_KEYWORDS,
     "moe_forward(state, x, params, training=True, plr_target=None) -> y (B,L,D)."},
    {"moe_backward", KW py_moe_backward, METH_VARARGS | METH_KEYWORDS,
     "moe_backward(state, dy, x, params, grads) -> dx (B,L,D); grads accumulate. x=None: the "
     "last forward's own input (which the state keeps)."},
    {"moe_forward_ptr", py_moe_forward_ptr, METH_VARARGS,
     "moe_forward_ptr(state, y, x, params, B, L, training): moe_forward on memory of the "
     "state's backend given by address (no staging)."},
    {"moe_backward_ptr", py_moe_backward_ptr, METH_VARARGS,
     "moe_backward_ptr(state, dx, grads, dy, x, params): moe_backward on memory given by "
     "address; grads accumulate."},
    {"moe_get", py_moe_get, METH_VARARGS, "moe_get(state, name) -> a copy of what the last forward left."},
    {"moe_set_threshold", py_moe_set_threshold, METH_VARARGS, "moe_set_threshold(state, tau (a number or 1-D values) or None)."},
    {"moe_precision", py_moe_precision, METH_VARARGS,
     "moe_precision(state, precision=None) -> the previous expert GEMM precision."},
    {"moe_device", py_moe_device, METH_O, "moe_device(state) -> the device name."},
    {NULL, NULL, 0, NULL}};

int rd_bind_moe(PyObject *m) {
    find_blas_thread_control();
    rd_set_threading(rd_have_blas_thread_control() ? RD_THREADS_OMP : RD_THREADS_BLAS);
    return PyModule_AddFunctions(m, moe_methods);
}
