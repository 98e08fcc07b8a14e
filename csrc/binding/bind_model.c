/* bind_model.c — Python functions of the model area: the DiT layers one by one (for the
 * tests and notebooks: racedit._C.dit_<layer>_forward/_backward) and the whole model
 * behind an opaque capsule (racedit._C.model_*), which racedit.model.RaceDiT wraps. */
#include "bind.h"

#include <string.h>

#define F32 NPY_FLOAT32
#define I64 NPY_INT64

/* Input array with the given shape (RD_ANY wildcards), or `goto done` with the exception. */
#define IN(var, obj, name, type, nd, ...)                                     \
    do {                                                                      \
        npy_intp sh_[] = {__VA_ARGS__};                                       \
        if (!((var) = rd_in_array((obj), (name), (type), (nd), sh_))) goto done; \
    } while (0)
/* A checked size product (RD_SIZE), or `goto done` with its exception. */
#define SIZE(var, what, ...)                                                 \
    do {                                                                     \
        rd_status sz_ = RD_SIZE(&(var), sizeof(float), (what), __VA_ARGS__); \
        if (sz_) { rd_raise(sz_); goto done; }                               \
    } while (0)
/* The C kernel, with the GIL released; a failure raises and jumps to done. */
#define RUN(call)                              \
    do {                                       \
        rd_status st_;                         \
        Py_BEGIN_ALLOW_THREADS st_ = (call);   \
        Py_END_ALLOW_THREADS                   \
        if (st_) { rd_raise(st_); goto done; } \
    } while (0)
#define NEW(var, nd, ...)                                              \
    do {                                                               \
        npy_intp sh_[] = {__VA_ARGS__};                                \
        if (!((var) = rd_new_array((nd), sh_, F32))) goto done;        \
    } while (0)
#define DIM(a, i) ((int64_t)PyArray_DIM((a), (i)))
#define FP(a) ((float *)PyArray_DATA(a))
#define IP(a) ((int64_t *)PyArray_DATA(a))

static int positive(long long v, const char *name) {
    if (v >= 1) return 0;
    PyErr_Format(PyExc_ValueError, "%s: expected >= 1, got %lld", name, v);
    return -1;
}

static int parse_order(PyObject *obj, rd_patch_order *out) {
    const char *s = rd_str_text(obj);
    if (s && strcmp(s, "cij") == 0) { *out = RD_PATCH_CIJ; return 0; }
    if (s && strcmp(s, "ijc") == 0) { *out = RD_PATCH_IJC; return 0; }
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "order: expected 'cij' or 'ijc', got %R", obj);
    return -1;
}

/* ---- layers -------------------------------------------------------------------------- */

static PyObject *py_patchify(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"img", "p", "order", NULL};
    PyObject *o, *ord = NULL, *ret = NULL;
    long long p;
    PyArrayObject *img = NULL, *tok = NULL;
    rd_patch_order order = RD_PATCH_IJC;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OL|O", kws, &o, &p, &ord)) return NULL;
    if (positive(p, "p") < 0 || (ord && parse_order(ord, &order) < 0)) return NULL;
    IN(img, o, "img", F32, 4, RD_ANY, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(img, 0), C = DIM(img, 1), H = DIM(img, 2), W = DIM(img, 3);
    if (H % p || W % p) {
        PyErr_Format(PyExc_ValueError, "img: spatial size %lldx%lld is not a multiple of p=%lld",
                     (long long)H, (long long)W, p);
        goto done;
    }
    int64_t ppc;
    SIZE(ppc, "tok: patch width p*p*C", p, p, C);
    NEW(tok, 3, B, (H / p) * (W / p), ppc);
    if (B > 0) RUN(rd_patchify_forward(FP(tok), FP(img), B, C, H, W, p, order));
    ret = (PyObject *)tok;
    tok = NULL;
done:
    Py_XDECREF(img);
    Py_XDECREF(tok);
    return ret;
}

static PyObject *py_unpatchify(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"tok", "C", "H", "W", "p", "order", NULL};
    PyObject *o, *ord = NULL, *ret = NULL;
    long long C, H, W, p;
    PyArrayObject *tok = NULL, *img = NULL;
    rd_patch_order order = RD_PATCH_IJC;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLLLL|O", kws, &o, &C, &H, &W, &p, &ord))
        return NULL;
    if (positive(C, "C") < 0 || positive(H, "H") < 0 || positive(W, "W") < 0 ||
        positive(p, "p") < 0 || (ord && parse_order(ord, &order) < 0))
        return NULL;
    if (H % p || W % p)
        return PyErr_Format(PyExc_ValueError, "H, W: %lldx%lld is not a multiple of p=%lld", H,
                            W, p);
    int64_t L, ppc;
    SIZE(L, "tok: tokens (H/p)*(W/p)", H / p, W / p);
    SIZE(ppc, "tok: patch width p*p*C", p, p, C);
    IN(tok, o, "tok", F32, 3, RD_ANY, L, ppc);
    const int64_t B = DIM(tok, 0);
    NEW(img, 4, B, C, H, W);
    if (B > 0) RUN(rd_unpatchify_forward(FP(img), FP(tok), B, C, H, W, p, order));
    ret = (PyObject *)img;
    img = NULL;
done:
    Py_XDECREF(tok);
    Py_XDECREF(img);
    return ret;
}

static PyObject *py_pos_embed(PyObject *self, PyObject *args) {
    (void)self;
    long long gh, gw, D;
    PyObject *ret = NULL;
    PyArrayObject *pe = NULL;
    if (!PyArg_ParseTuple(args, "LLL", &gh, &gw, &D)) return NULL;
    if (positive(gh, "gh") < 0 || positive(gw, "gw") < 0 || positive(D, "D") < 0) return NULL;
    if (D % 4) return PyErr_Format(PyExc_ValueError, "D: expected a multiple of 4, got %lld", D);
    int64_t L, n;
    SIZE(L, "pe: tokens gh*gw", gh, gw);
    SIZE(n, "pe (gh*gw, D)", L, D);
    NEW(pe, 2, L, D);
    RUN(rd_pos_embed_2d(FP(pe), gh, gw, D));
    ret = (PyObject *)pe;
    pe = NULL;
done:
    Py_XDECREF(pe);
    return ret;
}

static PyObject *py_timestep_embedding(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"t", "dim", "max_period", NULL};
    PyObject *o, *ret = NULL;
    long long F = RD_FREQ_DIM;
    float mp = RD_MAX_PERIOD;
    PyArrayObject *t = NULL, *e = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Lf", kws, &o, &F, &mp)) return NULL;
    if (positive(F, "dim") < 0) return NULL;
    if (F % 2) return PyErr_Format(PyExc_ValueError, "dim: expected an even number, got %lld", F);
    IN(t, o, "t", F32, 1, RD_ANY);
    NEW(e, 2, DIM(t, 0), F);
    if (DIM(t, 0) > 0) RUN(rd_timestep_embedding_forward(FP(e), FP(t), DIM(t, 0), F, mp));
    ret = (PyObject *)e;
    e = NULL;
done:
    Py_XDECREF(t);
    Py_XDECREF(e);
    return ret;
}

static PyObject *py_linear_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oi, *ow, *ob = Py_None, *ret = NULL;
    PyArrayObject *inp = NULL, *W = NULL, *b = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "OO|O", &oi, &ow, &ob)) return NULL;
    IN(inp, oi, "inp", F32, 2, RD_ANY, RD_ANY);
    IN(W, ow, "W", F32, 2, RD_ANY, DIM(inp, 1));
    if (ob != Py_None) IN(b, ob, "b", F32, 1, DIM(W, 0));
    NEW(out, 2, DIM(inp, 0), DIM(W, 0));
    RUN(rd_linear_forward(FP(out), FP(inp), FP(W), b ? FP(b) : NULL, DIM(inp, 0), DIM(inp, 1),
                          DIM(W, 0)));
    ret = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(inp);
    Py_XDECREF(W);
    Py_XDECREF(b);
    Py_XDECREF(out);
    return ret;
}

static PyObject *py_linear_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *od, *oi, *ow, *odw, *odb = Py_None, *ret = NULL;
    PyArrayObject *dout = NULL, *inp = NULL, *W = NULL, *dW, *db = NULL, *dinp = NULL;
    if (!PyArg_ParseTuple(args, "OOOO|O", &od, &oi, &ow, &odw, &odb)) return NULL;
    IN(dout, od, "dout", F32, 2, RD_ANY, RD_ANY);
    IN(inp, oi, "inp", F32, 2, DIM(dout, 0), RD_ANY);
    IN(W, ow, "W", F32, 2, DIM(dout, 1), DIM(inp, 1));
    {
        npy_intp s[] = {DIM(W, 0), DIM(W, 1)};
        if (!(dW = rd_out_array(odw, "dW", F32, 2, s))) goto done;
    }
    if (odb != Py_None) {
        npy_intp s[] = {DIM(W, 0)};
        if (!(db = rd_out_array(odb, "db", F32, 1, s))) goto done;
    }
    NEW(dinp, 2, DIM(inp, 0), DIM(inp, 1));
    RUN(rd_linear_backward(FP(dinp), FP(dW), db ? FP(db) : NULL, FP(dout), FP(inp), FP(W),
                           DIM(inp, 0), DIM(inp, 1), DIM(W, 0)));
    ret = (PyObject *)dinp;
    dinp = NULL;
done:
    Py_XDECREF(dout);
    Py_XDECREF(inp);
    Py_XDECREF(W);
    Py_XDECREF(dinp);
    return ret;
}

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oi, *ret = NULL;
    PyArrayObject *inp = NULL, *out = NULL, *rstd = NULL;
    if (!PyArg_ParseTuple(args, "O", &oi)) return NULL;
    IN(inp, oi, "inp", F32, 2, RD_ANY, RD_ANY);
    NEW(out, 2, DIM(inp, 0), DIM(inp, 1));
    NEW(rstd, 1, DIM(inp, 0));
    RUN(rd_layernorm_forward(FP(out), FP(rstd), FP(inp), DIM(inp, 0), DIM(inp, 1)));
    ret = Py_BuildValue("OO", out, rstd);
done:
    Py_XDECREF(inp);
    Py_XDECREF(out);
    Py_XDECREF(rstd);
    return ret;
}

static PyObject *py_layernorm_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oa, *od, *oo, *orr, *ret = NULL;
    PyArrayObject *dacc, *dout = NULL, *out = NULL, *rstd = NULL;
    if (!PyArg_ParseTuple(args, "OOOO", &oa, &od, &oo, &orr)) return NULL;
    IN(dout, od, "dout", F32, 2, RD_ANY, RD_ANY);
    IN(out, oo, "out", F32, 2, DIM(dout, 0), DIM(dout, 1));
    IN(rstd, orr, "rstd", F32, 1, DIM(dout, 0));
    {
        npy_intp s[] = {DIM(dout, 0), DIM(dout, 1)};
        if (!(dacc = rd_out_array(oa, "dinp_acc", F32, 2, s))) goto done;
    }
    RUN(rd_layernorm_backward(FP(dacc), FP(dout), FP(out), FP(rstd), DIM(dout, 0), DIM(dout, 1)));
    ret = Py_NewRef(Py_None);
done:
    Py_XDECREF(dout);
    Py_XDECREF(out);
    Py_XDECREF(rstd);
    return ret;
}

/* modulate and gated residual share the shape check: x (B,L,D) and per-sample rows (B,D). */
static PyObject *py_modulate_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oi, *osh, *osc, *ret = NULL;
    PyArrayObject *inp = NULL, *sh = NULL, *sc = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &oi, &osh, &osc)) return NULL;
    IN(inp, oi, "inp", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(inp, 0), L = DIM(inp, 1), D = DIM(inp, 2);
    IN(sh, osh, "shift", F32, 2, B, D);
    IN(sc, osc, "scale", F32, 2, B, D);
    NEW(out, 3, B, L, D);
    RUN(rd_modulate_forward(FP(out), FP(inp), FP(sh), FP(sc), B, L, D, D));
    ret = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(inp);
    Py_XDECREF(sh);
    Py_XDECREF(sc);
    Py_XDECREF(out);
    return ret;
}

static PyObject *py_modulate_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *od, *oi, *osc, *ret = NULL;
    PyArrayObject *dout = NULL, *inp = NULL, *sc = NULL, *dinp = NULL, *dsh = NULL, *dsc = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &od, &oi, &osc)) return NULL;
    IN(dout, od, "dout", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(dout, 0), L = DIM(dout, 1), D = DIM(dout, 2);
    IN(inp, oi, "inp", F32, 3, B, L, D);
    IN(sc, osc, "scale", F32, 2, B, D);
    NEW(dinp, 3, B, L, D);
    NEW(dsh, 2, B, D);
    NEW(dsc, 2, B, D);
    RUN(rd_modulate_backward(FP(dinp), FP(dsh), FP(dsc), FP(dout), FP(inp), FP(sc), B, L, D, D));
    ret = Py_BuildValue("OOO", dinp, dsh, dsc);
done:
    Py_XDECREF(dout);
    Py_XDECREF(inp);
    Py_XDECREF(sc);
    Py_XDECREF(dinp);
    Py_XDECREF(dsh);
    Py_XDECREF(dsc);
    return ret;
}

static PyObject *py_gated_residual_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oi, *oh, *og, *ret = NULL;
    PyArrayObject *inp = NULL, *h = NULL, *g = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &oi, &oh, &og)) return NULL;
    IN(inp, oi, "inp", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(inp, 0), L = DIM(inp, 1), D = DIM(inp, 2);
    IN(h, oh, "h", F32, 3, B, L, D);
    IN(g, og, "gate", F32, 2, B, D);
    NEW(out, 3, B, L, D);
    RUN(rd_gated_residual_forward(FP(out), FP(inp), FP(h), FP(g), B, L, D, D));
    ret = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(inp);
    Py_XDECREF(h);
    Py_XDECREF(g);
    Py_XDECREF(out);
    return ret;
}

static PyObject *py_gated_residual_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *od, *oh, *og, *ret = NULL;
    PyArrayObject *dout = NULL, *h = NULL, *g = NULL, *dh = NULL, *dg = NULL;
    if (!PyArg_ParseTuple(args, "OOO", &od, &oh, &og)) return NULL;
    IN(dout, od, "dout", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(dout, 0), L = DIM(dout, 1), D = DIM(dout, 2);
    IN(h, oh, "h", F32, 3, B, L, D);
    IN(g, og, "gate", F32, 2, B, D);
    NEW(dh, 3, B, L, D);
    NEW(dg, 2, B, D);
    RUN(rd_gated_residual_backward(FP(dh), FP(dg), FP(dout), FP(h), FP(g), B, L, D, D));
    ret = Py_BuildValue("OO", dh, dg);
done:
    Py_XDECREF(dout);
    Py_XDECREF(h);
    Py_XDECREF(g);
    Py_XDECREF(dh);
    Py_XDECREF(dg);
    return ret;
}

static int check_heads(int64_t D3, long long NH) {
    if (positive(NH, "heads") < 0) return -1;
    if (D3 % 3 || (D3 / 3) % NH) {
        PyErr_Format(PyExc_ValueError, "qkv: last dim %lld is not 3*D with D a multiple of "
                     "heads=%lld", (long long)D3, NH);
        return -1;
    }
    return 0;
}

static PyObject *py_attention_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oq, *ret = NULL;
    long long NH;
    PyArrayObject *qkv = NULL, *out = NULL, *att = NULL;
    if (!PyArg_ParseTuple(args, "OL", &oq, &NH)) return NULL;
    IN(qkv, oq, "qkv", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(qkv, 0), L = DIM(qkv, 1), D = DIM(qkv, 2) / 3;
    if (check_heads(DIM(qkv, 2), NH) < 0) goto done;
    NEW(out, 3, B, L, D);
    NEW(att, 4, B, NH, L, L);
    RUN(rd_attention_forward(FP(out), FP(att), FP(qkv), B, L, D, NH));
    ret = Py_BuildValue("OO", out, att);
done:
    Py_XDECREF(qkv);
    Py_XDECREF(out);
    Py_XDECREF(att);
    return ret;
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *od, *oq, *oa, *ret = NULL;
    long long NH;
    PyArrayObject *dout = NULL, *qkv = NULL, *att = NULL, *dqkv = NULL, *datt = NULL;
    if (!PyArg_ParseTuple(args, "OOOL", &od, &oq, &oa, &NH)) return NULL;
    IN(qkv, oq, "qkv", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    const int64_t B = DIM(qkv, 0), L = DIM(qkv, 1), D = DIM(qkv, 2) / 3;
    if (check_heads(DIM(qkv, 2), NH) < 0) goto done;
    IN(dout, od, "dout", F32, 3, B, L, D);
    IN(att, oa, "att", F32, 4, B, NH, L, L);
    NEW(dqkv, 3, B, L, 3 * D);
    NEW(datt, 4, B, NH, L, L);
    RUN(rd_attention_backward(FP(dqkv), FP(datt), FP(dout), FP(qkv), FP(att), B, L, D, NH));
    ret = (PyObject *)dqkv;
    dqkv = NULL;
done:
    Py_XDECREF(dout);
    Py_XDECREF(qkv);
    Py_XDECREF(att);
    Py_XDECREF(dqkv);
    Py_XDECREF(datt);
    return ret;
}

/* Elementwise SiLU / GELU-tanh on 1-D arrays: forward(x) or backward(dout, x). */
typedef rd_status (*ew_fwd)(float *, const float *, int64_t);
typedef rd_status (*ew_bwd)(float *, const float *, const float *, int64_t);

static PyObject *elementwise(PyObject *args, ew_fwd fwd, ew_bwd bwd) {
    PyObject *o1, *o2 = NULL, *ret = NULL;
    PyArrayObject *a = NULL, *b = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, bwd ? "OO" : "O", &o1, &o2)) return NULL;
    IN(a, o1, bwd ? "dout" : "inp", F32, 1, RD_ANY);
    if (bwd) IN(b, o2, "inp", F32, 1, DIM(a, 0));
    NEW(out, 1, DIM(a, 0));
    if (bwd) RUN(bwd(FP(out), FP(a), FP(b), DIM(a, 0)));
    else RUN(fwd(FP(out), FP(a), DIM(a, 0)));
    ret = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(out);
    return ret;
}
static PyObject *py_silu_forward(PyObject *s, PyObject *a) { (void)s; return elementwise(a, rd_silu_forward, NULL); }
static PyObject *py_silu_backward(PyObject *s, PyObject *a) { (void)s; return elementwise(a, NULL, rd_silu_backward); }
static PyObject *py_gelu_forward(PyObject *s, PyObject *a) { (void)s; return elementwise(a, rd_gelu_forward, NULL); }
static PyObject *py_gelu_backward(PyObject *s, PyObject *a) { (void)s; return elementwise(a, NULL, rd_gelu_backward); }

static PyObject *py_embedding_forward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *oy, *ot, *ret = NULL;
    PyArrayObject *y = NULL, *tab = NULL, *out = NULL;
    if (!PyArg_ParseTuple(args, "OO", &oy, &ot)) return NULL;
    IN(y, oy, "y", I64, 1, RD_ANY);
    IN(tab, ot, "table", F32, 2, RD_ANY, RD_ANY);
    NEW(out, 2, DIM(y, 0), DIM(tab, 1));
    RUN(rd_embedding_forward(FP(out), IP(y), FP(tab), DIM(y, 0), DIM(tab, 0), DIM(tab, 1)));
    ret = (PyObject *)out;
    out = NULL;
done:
    Py_XDECREF(y);
    Py_XDECREF(tab);
    Py_XDECREF(out);
    return ret;
}

static PyObject *py_embedding_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *od, *oy, *ot, *ret = NULL;
    PyArrayObject *dout = NULL, *y = NULL, *dtab;
    if (!PyArg_ParseTuple(args, "OOO", &od, &oy, &ot)) return NULL;
    IN(y, oy, "y", I64, 1, RD_ANY);
    if (!(dtab = rd_out_array(ot, "dtable", F32, 2, NULL))) goto done;
    IN(dout, od, "dout", F32, 2, DIM(y, 0), DIM(dtab, 1));
    RUN(rd_embedding_backward(FP(dtab), FP(dout), IP(y), DIM(y, 0), DIM(dtab, 0), DIM(dtab, 1)));
    ret = Py_NewRef(Py_None);
done:
    Py_XDECREF(dout);
    Py_XDECREF(y);
    return ret;
}

/* ---- the model --------------------------------------------------------------------------- */

/* The capsule's payload. `busy` refuses a second thread entering the same model while
 * the first works on it (take_box / rd_give). */
typedef struct {
    rd_model *m;
    rd_busy busy;
} model_box;

#define CAPSULE_NAME "racedit._C.model"

static void capsule_free(PyObject *cap) {
    model_box *box = PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (box) {
        rd_model_free(box->m);
        PyMem_Free(box);
    }
}

static model_box *get_box(PyObject *cap) {
    model_box *box = PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (!box) return NULL;
    if (box->busy) {
        PyErr_SetString(PyExc_RuntimeError, "model: in use by another thread");
        return NULL;
    }
    return box;
}

/* The box claimed for this call (give it back with rd_give(&box->busy)), or NULL with the
 * exception: taken before anything that may release the GIL. */
static model_box *take_box(PyObject *cap) {
    model_box *box = PyCapsule_GetPointer(cap, CAPSULE_NAME);
    if (box && rd_take(&box->busy, "model") < 0) return NULL;
    return box;
}

static PyObject *py_model_new(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"depth", "hidden", "heads", "patch", "input_size", "in_channels",
                          "out_channels", "num_classes", "num_experts", "k", "expert_hidden",
                          "strategy", "gating", "beta", "eval_topk", "plr_weight", "sim_weight",
                          "balance_weight", NULL};
    long long depth, D, NH, p, S, C, Co, ncls, E = 0, k = 1, He = 0;
    PyObject *ostrat = NULL, *ogate = NULL;
    float beta = 0.99f, plr_w = 1.0f, sim_w = 0.01f, bal_w = 0.0f;
    int eval_topk = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLLLLL|LLLOOfpfff", kws, &depth, &D, &NH, &p, &S,
                                     &C, &Co, &ncls, &E, &k, &He, &ostrat, &ogate, &beta,
                                     &eval_topk, &plr_w, &sim_w, &bal_w))
        return NULL;
    rd_model_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.depth = depth, cfg.D = D, cfg.NH = NH, cfg.patch = p, cfg.input_size = S;
    cfg.in_channels = C, cfg.out_channels = Co, cfg.num_classes = ncls;
    cfg.moe.D = D, cfg.moe.E = E, cfg.moe.k = k, cfg.moe.He = He;
    cfg.moe.strategy = RD_ROUTE_RACE, cfg.moe.gating = RD_GATE_IDENTITY;
    if (ostrat && ostrat != Py_None && rd_parse_strategy(ostrat, "routing", &cfg.moe.strategy) < 0)
        return NULL;
    if (ogate && ogate != Py_None && rd_parse_gating(ogate, "gating", &cfg.moe.gating) < 0)
        return NULL;
    cfg.moe.beta = beta, cfg.moe.eval_topk = eval_topk;
    cfg.moe.plr_weight = plr_w, cfg.moe.sim_weight = sim_w, cfg.moe.balance_weight = bal_w;
    model_box *box = PyMem_Calloc(1, sizeof *box);
    if (!box) return PyErr_NoMemory();
    rd_status st = rd_model_new(&box->m, &cfg);
    if (st) {
        PyMem_Free(box);
        return rd_raise(st);
    }
    PyObject *cap = PyCapsule_New(box, CAPSULE_NAME, capsule_free);
    if (!cap) {
        rd_model_free(box->m);
        PyMem_Free(box);
    }
    return cap;
}

/* [(name, offset, shape), ...] in buffer order. */
static PyObject *py_model_layout(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = get_box(cap);
    if (!box) return NULL;
    const int n = rd_model_num_tensors(box->m);
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (int i = 0; i < n; i++) {
        const rd_tensor_info *t = rd_model_tensor(box->m, i);
        PyObject *shape = PyTuple_New(t->ndim);
        if (!shape) { Py_DECREF(list); return NULL; }
        for (int d = 0; d < t->ndim; d++)
            PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(t->shape[d]));
        PyObject *item = Py_BuildValue("(sLN)", t->name, (long long)t->offset, shape);
        if (!item) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *py_model_num_params(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = get_box(cap);
    return box ? PyLong_FromLongLong(rd_model_num_params(box->m)) : NULL;
}

static PyObject *py_model_batch(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    const long long mb = rd_model_max_batch(box->m), last = rd_model_last_batch(box->m);
    rd_give(&box->busy);
    return Py_BuildValue("LL", mb, last);
}

/* model_branch_norms(model) -> (depth, 2) float64: rd_model_branch_norms. */
static rd_status fill_branch_norms(void *m, double *out) { return rd_model_branch_norms(m, out); }
static PyObject *py_model_branch_norms(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    PyObject *ret = rd_f64_result(rd_model_config(box->m)->depth, 2, fill_branch_norms, box->m);
    rd_give(&box->busy);
    return ret;
}

static PyObject *py_model_reserve(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    long long mb;
    int fixed;
    if (!PyArg_ParseTuple(args, "OLp", &cap, &mb, &fixed)) return NULL;
    if (mb < 1) return PyErr_Format(PyExc_ValueError, "max_batch: expected >= 1, got %lld", mb);
    model_box *box = take_box(cap);
    if (!box) return NULL;
    rd_status st;
    Py_BEGIN_ALLOW_THREADS st = rd_model_reserve(box->m, mb, fixed);
    Py_END_ALLOW_THREADS
    rd_give(&box->busy);
    if (st) return rd_raise(st);
    Py_RETURN_NONE;
}

/* params as a read-only flat float32 array of the model's size (not converted: a copy
 * would hide that the caller's buffer is not the one read). */
static PyArrayObject *param_array(PyObject *o, const char *name, const rd_model *m) {
    npy_intp n[] = {rd_model_num_params(m)};
    if (!PyArray_Check(o) || PyArray_TYPE((PyArrayObject *)o) != NPY_FLOAT32 ||
        PyArray_NDIM((PyArrayObject *)o) != 1 || PyArray_DIM((PyArrayObject *)o, 0) != n[0] ||
        !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)o) || !PyArray_ISALIGNED((PyArrayObject *)o)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous 1-d float32 array of %lld "
                     "elements", name, (long long)n[0]);
        return NULL;
    }
    return (PyArrayObject *)o;
}

/* out (B,Co,S,S) of x, t, y (and plr_target, None or an array): rd_model_forward, or
 * with `infer` rd_model_infer (plr_target None), run with the GIL released. */
static PyObject *model_run(PyObject *cap, PyObject *op, PyObject *ox, PyObject *ot,
                           PyObject *oy, PyObject *oplr, int training, int infer) {
    PyObject *ret = NULL;
    PyArrayObject *x = NULL, *t = NULL, *y = NULL, *plr = NULL, *out = NULL, *P;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    const rd_model_cfg *c = rd_model_config(box->m);
    const int64_t S = c->input_size;
    if (!(P = param_array(op, "params", box->m))) goto done;
    IN(x, ox, "x", F32, 4, RD_ANY, c->in_channels, S, S);
    const int64_t B = DIM(x, 0);
    if (B < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected a batch of at least 1 image");
        goto done;
    }
    IN(t, ot, "t", F32, 1, B);
    IN(y, oy, "y", I64, 1, B);
    if (oplr != Py_None) IN(plr, oplr, "plr_target", F32, 4, B, c->in_channels, S, S);
    NEW(out, 4, B, c->out_channels, S, S);
    RUN(infer ? rd_model_infer(box->m, FP(out), FP(P), FP(x), FP(t), IP(y), B)
              : rd_model_forward(box->m, FP(out), FP(P), FP(x), FP(t), IP(y),
                                 plr ? FP(plr) : NULL, B, training));
    ret = (PyObject *)out;
    out = NULL;
done:
    rd_give(&box->busy);
    Py_XDECREF(x);
    Py_XDECREF(t);
    Py_XDECREF(y);
    Py_XDECREF(plr);
    Py_XDECREF(out);
    return ret;
}

static PyObject *py_model_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"model", "params", "x", "t", "y", "plr_target", "training", NULL};
    PyObject *cap, *op, *ox, *ot, *oy, *oplr = Py_None;
    int training = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO|Op", kws, &cap, &op, &ox, &ot, &oy, &oplr,
                                     &training))
        return NULL;
    return model_run(cap, op, ox, ot, oy, oplr, training, 0);
}

/* model_infer(model, params, x, t, y) -> out: rd_model_infer (eval mode, no backward). */
static PyObject *py_model_infer(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *op, *ox, *ot, *oy;
    if (!PyArg_ParseTuple(args, "OOOOO", &cap, &op, &ox, &ot, &oy)) return NULL;
    return model_run(cap, op, ox, ot, oy, Py_None, 0, 1);
}

static PyObject *py_model_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *op, *og, *od, *ret = NULL;
    PyArrayObject *P, *G, *dout = NULL;
    if (!PyArg_ParseTuple(args, "OOOO", &cap, &op, &og, &od)) return NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    const rd_model_cfg *c = rd_model_config(box->m);
    const int64_t B = rd_model_last_batch(box->m), S = c->input_size;
    if (B == 0) {
        PyErr_SetString(PyExc_RuntimeError, "backward called before forward");
        goto done;
    }
    if (!(P = param_array(op, "params", box->m))) goto done;
    npy_intp n[] = {rd_model_num_params(box->m)};
    if (!(G = rd_out_array(og, "grads", F32, 1, n))) goto done;
    IN(dout, od, "dout", F32, 4, B, c->out_channels, S, S);
    if (rd_check_disjoint(G, "grads", (PyArrayObject *[]){P, dout}, 2,
                          (const char *[]){"params", "dout"}) < 0)
        goto done;
    RUN(rd_model_backward(box->m, FP(G), FP(dout), FP(P)));
    ret = Py_NewRef(Py_None);
done:
    rd_give(&box->busy);
    Py_XDECREF(dout);
    return ret;
}

/* model_infer_release(model): free the inference arena; model_infer_batch(model) -> its batch. */
static PyObject *py_model_infer_release(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    rd_model_infer_release(box->m);
    rd_give(&box->busy);
    Py_RETURN_NONE;
}

static PyObject *py_model_infer_batch(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = get_box(cap);
    return box ? PyLong_FromLongLong(rd_model_infer_batch(box->m)) : NULL;
}

/* Claims the model (take_box) and finds MoE layer l; on failure nothing stays claimed. */
static int get_layer(PyObject *cap, long long l, model_box **box, rd_moe_state **st) {
    if (!(*box = take_box(cap))) return -1;
    const int64_t n = rd_model_num_moe((*box)->m);
    if (l < 0 || l >= n) {
        rd_give(&(*box)->busy);
        PyErr_Format(PyExc_IndexError, "layer: expected 0 <= layer < %lld (MoE layers), got %lld",
                     (long long)n, l);
        return -1;
    }
    *st = rd_model_moe_state((*box)->m, l);
    return 0;
}

/* A float, or NaN when the loss was not computed by the last forward. */
static double loss_or_nan(int has, float v) { return has ? (double)v : Py_NAN; }

/* dict of MoE layer l's last forward: have_forward, have_tau, tau, tau_b, pairs,
 * mask (B,L,E) bool and load (E,) int64 (copies, None before any forward), the unweighted
 * losses sim, balance, plr (NaN when not computed), aux_loss (this layer's weighted sum),
 * max_violation, combination_usage, experts_per_token, dead_experts. */
static PyObject *py_model_moe_view(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *mask = NULL, *load = NULL, *ret = NULL;
    long long l;
    model_box *box;
    rd_moe_state *st;
    if (!PyArg_ParseTuple(args, "OL", &cap, &l) || get_layer(cap, l, &box, &st) < 0) return NULL;
    rd_moe_view v;
    rd_moe_aux a;
    rd_moe_state_view(st, &v);
    rd_status s = rd_moe_get_aux(st, &a);
    if (s) { rd_raise(s); goto done; }
    if (v.have_forward) {
        npy_intp ms[] = {v.B, v.L, v.E}, cs[] = {v.E};
        if (!(mask = PyArray_SimpleNew(3, ms, NPY_BOOL))) goto done;
        memcpy(PyArray_DATA((PyArrayObject *)mask), v.mask, (size_t)(v.N * v.E));
        if (!(load = PyArray_SimpleNew(1, cs, NPY_INT64))) goto done;
        memcpy(PyArray_DATA((PyArrayObject *)load), v.counts, (size_t)v.E * sizeof(int64_t));
    }
    ret = Py_BuildValue(
        "{s:O,s:O,s:d,s:d,s:L,s:O,s:O,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:L}",
        "have_forward", v.have_forward ? Py_True : Py_False,
        "have_tau", v.have_tau ? Py_True : Py_False, "tau", (double)v.tau,
        "tau_b", (double)v.tau_b, "pairs", (long long)v.P, "mask", mask ? mask : Py_None,
        "load", load ? load : Py_None, "sim", loss_or_nan(a.has_sim, a.sim_loss),
        "balance", loss_or_nan(a.has_balance, a.balance_loss),
        "plr", loss_or_nan(a.has_plr, a.plr_loss), "aux_loss", (double)a.aux_loss,
        "max_violation", a.max_violation, "combination_usage", a.combination_usage,
        "experts_per_token", a.experts_per_token, "dead_experts", (long long)a.dead_experts);
done:
    rd_give(&box->busy);
    Py_XDECREF(mask);
    Py_XDECREF(load);
    return ret;
}

/* Set MoE layer l's threshold to tau, or forget it when tau is None. */
static PyObject *py_model_set_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *otau;
    long long l;
    model_box *box;
    rd_moe_state *st;
    if (!PyArg_ParseTuple(args, "OLO", &cap, &l, &otau)) return NULL;
    const double d = otau == Py_None ? 0.0 : PyFloat_AsDouble(otau);
    if (d == -1.0 && PyErr_Occurred()) return NULL;
    if (get_layer(cap, l, &box, &st) < 0) return NULL;
    const float tau = (float)d;
    rd_status s = rd_moe_set_threshold(st, otau == Py_None ? NULL : &tau);
    rd_give(&box->busy);
    if (s) return rd_raise(s);
    Py_RETURN_NONE;
}

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef model_methods[] = {
    {"dit_patchify", KW py_patchify, METH_VARARGS | METH_KEYWORDS,
     "dit_patchify(img (B,C,H,W), p, order='ijc') -> tok (B,L,p*p*C)"},
    {"dit_unpatchify", KW py_unpatchify, METH_VARARGS | METH_KEYWORDS,
     "dit_unpatchify(tok (B,L,p*p*C), C, H, W, p, order='ijc') -> img (B,C,H,W)"},
    {"dit_pos_embed", py_pos_embed, METH_VARARGS, "dit_pos_embed(gh, gw, D) -> pe (gh*gw, D)"},
    {"dit_timestep_embedding", KW py_timestep_embedding, METH_VARARGS | METH_KEYWORDS,
     "dit_timestep_embedding(t (B,), dim=256, max_period=10000) -> (B, dim)"},
    {"dit_linear_forward", py_linear_forward, METH_VARARGS,
     "dit_linear_forward(inp (N,IC), W (OC,IC), b (OC,)=None) -> out (N,OC)"},
    {"dit_linear_backward", py_linear_backward, METH_VARARGS,
     "dit_linear_backward(dout, inp, W, dW, db=None) -> dinp; dW, db accumulate in place"},
    {"dit_layernorm_forward", py_layernorm_forward, METH_VARARGS,
     "dit_layernorm_forward(inp (N,D)) -> (out (N,D), rstd (N,))"},
    {"dit_layernorm_backward", py_layernorm_backward, METH_VARARGS,
     "dit_layernorm_backward(dinp_acc, dout, out, rstd): dinp_acc (N,D) accumulates in place"},
    {"dit_modulate_forward", py_modulate_forward, METH_VARARGS,
     "dit_modulate_forward(inp (B,L,D), shift (B,D), scale (B,D)) -> out"},
    {"dit_modulate_backward", py_modulate_backward, METH_VARARGS,
     "dit_modulate_backward(dout, inp, scale) -> (dinp, dshift, dscale)"},
    {"dit_gated_residual_forward", py_gated_residual_forward, METH_VARARGS,
     "dit_gated_residual_forward(inp (B,L,D), h (B,L,D), gate (B,D)) -> inp + gate*h"},
    {"dit_gated_residual_backward", py_gated_residual_backward, METH_VARARGS,
     "dit_gated_residual_backward(dout, h, gate) -> (dh, dgate)"},
    {"dit_attention_forward", py_attention_forward, METH_VARARGS,
     "dit_attention_forward(qkv (B,L,3D), heads) -> (out (B,L,D), att (B,NH,L,L))"},
    {"dit_attention_backward", py_attention_backward, METH_VARARGS,
     "dit_attention_backward(dout (B,L,D), qkv, att, heads) -> dqkv (B,L,3D)"},
    {"dit_silu_forward", py_silu_forward, METH_VARARGS, "dit_silu_forward(inp (n,)) -> out"},
    {"dit_silu_backward", py_silu_backward, METH_VARARGS, "dit_silu_backward(dout, inp) -> dinp"},
    {"dit_gelu_forward", py_gelu_forward, METH_VARARGS, "dit_gelu_forward(inp (n,)) -> out"},
    {"dit_gelu_backward", py_gelu_backward, METH_VARARGS, "dit_gelu_backward(dout, inp) -> dinp"},
    {"dit_embedding_forward", py_embedding_forward, METH_VARARGS,
     "dit_embedding_forward(y (B,) int64, table (V,D)) -> (B,D)"},
    {"dit_embedding_backward", py_embedding_backward, METH_VARARGS,
     "dit_embedding_backward(dout (B,D), y, dtable (V,D)): dtable accumulates in place"},
    {"model_new", KW py_model_new, METH_VARARGS | METH_KEYWORDS,
     "model_new(depth, hidden, heads, patch, input_size, in_channels, out_channels, "
     "num_classes, num_experts=0, k=1, expert_hidden=0, strategy='race', gating='identity', "
     "beta=0.99, eval_topk=False, plr_weight=1, sim_weight=0.01, balance_weight=0) -> capsule"},
    {"model_layout", py_model_layout, METH_O, "model_layout(model) -> [(name, offset, shape)]"},
    {"model_num_params", py_model_num_params, METH_O, "model_num_params(model) -> int"},
    {"model_batch", py_model_batch, METH_O, "model_batch(model) -> (max_batch, last_batch)"},
    {"model_reserve", py_model_reserve, METH_VARARGS, "model_reserve(model, max_batch, fixed)"},
    {"model_branch_norms", py_model_branch_norms, METH_O,
     "model_branch_norms(model) -> (depth, 2) mean norms of the gated attention / FFN outputs"},
    {"model_forward", KW py_model_forward, METH_VARARGS | METH_KEYWORDS,
     "model_forward(model, params, x, t, y, plr_target=None, training=True) -> out"},
    {"model_infer", py_model_infer, METH_VARARGS,
     "model_infer(model, params, x, t, y) -> out: eval-mode forward keeping nothing for backward"},
    {"model_infer_release", py_model_infer_release, METH_O,
     "model_infer_release(model): free the inference activations"},
    {"model_infer_batch", py_model_infer_batch, METH_O,
     "model_infer_batch(model) -> batch the inference activations are allocated for (0: none)"},
    {"model_backward", py_model_backward, METH_VARARGS,
     "model_backward(model, params, grads, dout): grads accumulate in place"},
    {"model_moe_view", py_model_moe_view, METH_VARARGS,
     "model_moe_view(model, layer) -> dict of MoE layer `layer`'s last forward"},
    {"model_set_threshold", py_model_set_threshold, METH_VARARGS,
     "model_set_threshold(model, layer, tau or None)"},
    {NULL, NULL, 0, NULL}};

int rd_bind_model(PyObject *m) { return PyModule_AddFunctions(m, model_methods); }
