/* bind_dit.c — Python functions of the DiT layers one by one (racedit._C.dit_<layer>_<dir>,
 * named as their float64 twins racedit.ref.dit_*), each on any device: the arguments
 * checked once, the arrays staged in the device's memory, the op of its table run. */
#include "bind.h"

#include <string.h>

#define F32 NPY_FLOAT32
#define I64 NPY_INT64

/* The steps of bind.h on the function's rd_call `c`. */
#define IN(...) RD_IN(c, __VA_ARGS__)
#define NEW(var, nd, ...) RD_NEW(c, var, F32, nd, __VA_ARGS__)
#define DV(a) RD_DEV(c, a)
/* A checked size product (RD_SIZE), or `goto done` with its exception. */
#define SIZE(var, what, ...)                                                 \
    do {                                                                     \
        rd_status sz_ = RD_SIZE(&(var), sizeof(float), (what), __VA_ARGS__); \
        if (sz_) { rd_raise(sz_); goto done; }                               \
    } while (0)
#define DIM(a, i) ((int64_t)PyArray_DIM((a), (i)))
#define KW (PyCFunction)(void (*)(void))
#define ARGS METH_VARARGS | METH_KEYWORDS

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

/* A backend context at `prec` for the ops that take one (linear, attention), freed with
 * the call `c`; first the device checked, as staging would. */
static int new_ctx(rd_call *c, const rd_backend *be, int prec) {
    if (rd_device_ready(be) < 0) return -1;
    rd_status s = be->ctx_new(&c->free_arg);
    c->free_fn = be->ctx_free;
    if (!s) s = be->set_precision(c->free_arg, prec);
    return s ? (rd_raise(s), -1) : 0;
}

/* ---- patches and embeddings --------------------------------------------------------- */

static PyObject *py_patchify(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"img", "p", "order", "device", NULL};
    PyObject *o, *ord = NULL, *odev = NULL, *ret = NULL;
    long long p;
    PyArrayObject *img, *tok;
    rd_patch_order order = RD_PATCH_IJC;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OL|O$O", kws, &o, &p, &ord, &odev) ||
        rd_parse_device(odev, &be) < 0 || positive(p, "p") < 0 || (ord && parse_order(ord, &order) < 0))
        return NULL;
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
    if (B > 0) RD_CALL_RUN(c, be, be->patchify(DV(tok), DV(img), B, C, H, W, p, order));
    ret = Py_NewRef((PyObject *)tok);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_unpatchify(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"tok", "C", "H", "W", "p", "order", "device", NULL};
    PyObject *o, *ord = NULL, *odev = NULL, *ret = NULL;
    long long C, H, W, p;
    PyArrayObject *tok, *img;
    rd_patch_order order = RD_PATCH_IJC;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OLLLL|O$O", kws, &o, &C, &H, &W, &p, &ord, &odev) ||
        rd_parse_device(odev, &be) < 0)
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
    if (B > 0) RD_CALL_RUN(c, be, be->unpatchify(DV(img), DV(tok), B, C, H, W, p, order));
    ret = Py_NewRef((PyObject *)img);
done:
    rd_call_end(&c);
    return ret;
}

/* The fixed sin-cos table, computed on the host (the model uploads it once). */
static PyObject *py_pos_embed(PyObject *self, PyObject *args) {
    (void)self;
    long long gh, gw, D;
    PyObject *ret = NULL;
    PyArrayObject *pe;
    rd_call c = {0};
    if (!PyArg_ParseTuple(args, "LLL", &gh, &gw, &D)) return NULL;
    if (positive(gh, "gh") < 0 || positive(gw, "gw") < 0 || positive(D, "D") < 0) return NULL;
    if (D % 4) return PyErr_Format(PyExc_ValueError, "D: expected a multiple of 4, got %lld", D);
    int64_t L, n;
    SIZE(L, "pe: tokens gh*gw", gh, gw);
    SIZE(n, "pe (gh*gw, D)", L, D);
    NEW(pe, 2, L, D);
    RD_CHECK(rd_pos_embed_2d((float *)PyArray_DATA(pe), gh, gw, D));
    ret = Py_NewRef((PyObject *)pe);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_timestep_embedding(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"t", "dim", "max_period", "device", NULL};
    PyObject *o, *odev = NULL, *ret = NULL;
    long long F = RD_FREQ_DIM;
    float mp = RD_MAX_PERIOD;
    PyArrayObject *t, *e;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|Lf$O", kws, &o, &F, &mp, &odev) ||
        rd_parse_device(odev, &be) < 0 || positive(F, "dim") < 0)
        return NULL;
    if (F % 2) return PyErr_Format(PyExc_ValueError, "dim: expected an even number, got %lld", F);
    if (!(mp > 0.0f)) return PyErr_Format(PyExc_ValueError, "max_period: expected > 0");
    IN(t, o, "t", F32, 1, RD_ANY);
    NEW(e, 2, DIM(t, 0), F);
    if (DIM(t, 0) > 0) RD_CALL_RUN(c, be, be->timestep_embedding(DV(e), DV(t), DIM(t, 0), F, mp));
    ret = Py_NewRef((PyObject *)e);
done:
    rd_call_end(&c);
    return ret;
}

/* ---- linear ------------------------------------------------------------------------------- */

static PyObject *py_linear_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"inp", "W", "b", "precision", "device", NULL};
    PyObject *oi, *ow, *ob = Py_None, *oprec = NULL, *odev = NULL, *ret = NULL;
    PyArrayObject *inp, *w, *b = NULL, *out;
    const rd_backend *be;
    rd_call c = {0};
    int prec;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O$OO", kws, &oi, &ow, &ob, &oprec, &odev) ||
        rd_parse_device(odev, &be) < 0 || rd_parse_precision(oprec, "precision", &prec) < 0)
        return NULL;
    IN(inp, oi, "inp", F32, 2, RD_ANY, RD_ANY);
    IN(w, ow, "W", F32, 2, RD_ANY, DIM(inp, 1));
    if (ob != Py_None) IN(b, ob, "b", F32, 1, DIM(w, 0));
    NEW(out, 2, DIM(inp, 0), DIM(w, 0));
    if (new_ctx(&c, be, prec) < 0) goto done;
    RD_CALL_RUN(c, be, be->linear_forward(c.free_arg, DV(out), DV(inp), DV(w), DV(b), DIM(inp, 0),
                                          DIM(inp, 1), DIM(w, 0)));
    ret = Py_NewRef((PyObject *)out);
done:
    rd_call_end(&c);
    return ret;
}

/* linear_backward(dout, inp, W, dW, db=None) -> dinp; dW, db accumulate in place. */
static PyObject *py_linear_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dout", "inp", "W", "dW", "db", "precision", "device", NULL};
    PyObject *od, *oi, *ow, *odw, *odb = Py_None, *oprec = NULL, *odev = NULL, *ret = NULL;
    PyArrayObject *dout, *inp, *w, *dW, *db = NULL, *dinp;
    const rd_backend *be;
    rd_call c = {0};
    int prec;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|O$OO", kws, &od, &oi, &ow, &odw, &odb,
                                     &oprec, &odev) ||
        rd_parse_device(odev, &be) < 0 || rd_parse_precision(oprec, "precision", &prec) < 0)
        return NULL;
    IN(dout, od, "dout", F32, 2, RD_ANY, RD_ANY);
    IN(inp, oi, "inp", F32, 2, DIM(dout, 0), RD_ANY);
    IN(w, ow, "W", F32, 2, DIM(dout, 1), DIM(inp, 1));
    const int64_t N = DIM(inp, 0), IC = DIM(inp, 1), OC = DIM(w, 0);
    RD_OUT(c, dW, odw, "dW", F32, 2, OC, IC);
    if (odb != Py_None) RD_OUT(c, db, odb, "db", F32, 1, OC);
    NEW(dinp, 2, N, IC);
    if (new_ctx(&c, be, prec) < 0) goto done;
    RD_CALL_RUN(c, be, be->linear_backward(c.free_arg, DV(dinp), DV(dW), DV(db), DV(dout), DV(inp),
                                           DV(w), N, IC, OC));
    ret = Py_NewRef((PyObject *)dinp);
done:
    rd_call_end(&c);
    return ret;
}

/* ---- LayerNorm ---------------------------------------------------------------------------- */

static PyObject *py_layernorm_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"inp", "device", NULL};
    PyObject *oi, *odev = NULL, *ret = NULL;
    PyArrayObject *inp, *out, *rstd;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|$O", kws, &oi, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    IN(inp, oi, "inp", F32, 2, RD_ANY, RD_ANY);
    NEW(out, 2, DIM(inp, 0), DIM(inp, 1));
    NEW(rstd, 1, DIM(inp, 0));
    RD_CALL_RUN(c, be, be->layernorm_forward(DV(out), DV(rstd), DV(inp), DIM(inp, 0), DIM(inp, 1)));
    ret = Py_BuildValue("OO", out, rstd);
done:
    rd_call_end(&c);
    return ret;
}

/* layernorm_backward(dout, out, rstd, dinp_acc=None) -> d(inp) (+ dinp_acc, not modified). */
static PyObject *py_layernorm_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dout", "out", "rstd", "dinp_acc", "device", NULL};
    PyObject *od, *oo, *orr, *oa = Py_None, *odev = NULL, *ret = NULL;
    PyArrayObject *dout, *out, *rstd, *acc, *dinp;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|O$O", kws, &od, &oo, &orr, &oa, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    IN(dout, od, "dout", F32, 2, RD_ANY, RD_ANY);
    const int64_t N = DIM(dout, 0), D = DIM(dout, 1);
    IN(out, oo, "out", F32, 2, N, D);
    IN(rstd, orr, "rstd", F32, 1, N);
    if (oa != Py_None) {
        IN(acc, oa, "dinp_acc", F32, 2, N, D);
        if (!(dinp = rd_call_add(&c, (PyArrayObject *)PyArray_NewCopy(acc, NPY_CORDER), 1, 1)))
            goto done;
    } else {
        NEW(dinp, 2, N, D);
    }
    RD_CALL_RUN(c, be, be->layernorm_backward(DV(dinp), DV(dout), DV(out), DV(rstd), N, D));
    ret = Py_NewRef((PyObject *)dinp);
done:
    rd_call_end(&c);
    return ret;
}

/* ---- modulate and gated residual: x (B,L,D) and per-sample rows (B,S), S >= D (the rows of
 * a wider adaLN output; the first D columns are used, the gradients' others are 0) -------- */

/* n3 arrays like the first (B,L,D), then nrows arrays (B,S) of one S >= D, into in[]. */
static int bld_inputs(rd_call *c, PyObject **o, const char **names, PyArrayObject **in, int n3,
                      int nrows, int64_t *z) {
    npy_intp s3[3] = {RD_ANY, RD_ANY, RD_ANY};
    if (!(in[0] = rd_call_in(c, o[0], names[0], F32, 3, s3))) return -1;
    for (int i = 1; i < n3; i++)
        if (!(in[i] = rd_call_in(c, o[i], names[i], F32, 3, PyArray_DIMS(in[0])))) return -1;
    z[0] = DIM(in[0], 0), z[1] = DIM(in[0], 1), z[2] = DIM(in[0], 2), z[3] = z[2];
    for (int i = n3; i < n3 + nrows; i++) {
        npy_intp sr[2] = {(npy_intp)z[0], i == n3 ? RD_ANY : (npy_intp)z[3]};
        if (!(in[i] = rd_call_in(c, o[i], names[i], F32, 2, sr))) return -1;
        z[3] = DIM(in[i], 1);
        if (z[3] < z[2]) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%lld, S) with S >= D = %lld, got "
                         "(%lld, %lld)", names[i], (long long)z[0], (long long)z[2],
                         (long long)z[0], (long long)z[3]);
            return -1;
        }
    }
    return 0;
}

typedef enum { MOD_F, MOD_B, GR_F, GR_B } bld_kind;

static rd_status bld_run(const rd_backend *be, bld_kind k, const rd_call *c, PyArrayObject **in,
                         PyArrayObject **out, const int64_t *z) {
    float *o[3];
    const float *i[3];
    for (int j = 0; j < 3; j++) o[j] = rd_call_dev(c, out[j]), i[j] = rd_call_dev(c, in[j]);
    switch (k) {
    case MOD_F: return be->modulate_forward(o[0], i[0], i[1], i[2], z[0], z[1], z[2], z[3]);
    case MOD_B: return be->modulate_backward(o[0], o[1], o[2], i[0], i[1], i[2], z[0], z[1], z[2], z[3]);
    case GR_F: return be->gated_residual_forward(o[0], i[0], i[1], i[2], z[0], z[1], z[2], z[3]);
    default: return be->gated_residual_backward(o[0], o[1], i[0], i[1], i[2], z[0], z[1], z[2], z[3]);
    }
}

/* The four ops: 3 inputs (n3 of shape (B,L,D), the rest rows), 1 output like x, then
 * nrowsout outputs (B,S). */
static PyObject *bld_op(PyObject *args, PyObject *kw, bld_kind k, char **kws, int n3,
                        int nrowsout) {
    PyObject *o[3], *odev = NULL, *ret = NULL;
    PyArrayObject *in[3], *out[3] = {0};
    const rd_backend *be;
    rd_call c = {0};
    int64_t z[4];
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|$O", kws, &o[0], &o[1], &o[2], &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    if (bld_inputs(&c, o, (const char **)kws, in, n3, 3 - n3, z) < 0) goto done;
    const int nout = 1 + nrowsout;
    if (!(out[0] = rd_call_new(&c, 3, PyArray_DIMS(in[0]), F32))) goto done;
    for (int i = 1; i < nout; i++) NEW(out[i], 2, z[0], z[3]);
    RD_CALL_RUN(c, be, bld_run(be, k, &c, in, out, z));
    ret = nout == 1 ? Py_NewRef((PyObject *)out[0])
                    : nout == 2 ? PyTuple_Pack(2, out[0], out[1]) : PyTuple_Pack(3, out[0], out[1], out[2]);
done:
    rd_call_end(&c);
    return ret;
}

static char *k_mod_f[] = {"inp", "shift", "scale", "device", NULL};
static char *k_mod_b[] = {"dout", "inp", "scale", "device", NULL};
static char *k_gr_f[] = {"inp", "h", "gate", "device", NULL};
static char *k_gr_b[] = {"dout", "h", "gate", "device", NULL};
static PyObject *py_modulate_forward(PyObject *s, PyObject *a, PyObject *k) {
    (void)s;
    return bld_op(a, k, MOD_F, k_mod_f, 1, 0);
}
static PyObject *py_modulate_backward(PyObject *s, PyObject *a, PyObject *k) {
    (void)s;
    return bld_op(a, k, MOD_B, k_mod_b, 2, 2);
}
static PyObject *py_gated_residual_forward(PyObject *s, PyObject *a, PyObject *k) {
    (void)s;
    return bld_op(a, k, GR_F, k_gr_f, 2, 0);
}
static PyObject *py_gated_residual_backward(PyObject *s, PyObject *a, PyObject *k) {
    (void)s;
    return bld_op(a, k, GR_B, k_gr_b, 2, 1);
}

/* ---- attention ---------------------------------------------------------------------------- */

static int check_heads(PyArrayObject *qkv, long long NH) {
    const int64_t D3 = DIM(qkv, 2);
    if (positive(NH, "heads") < 0) return -1;
    if (D3 % 3 || (D3 / 3) % NH) {
        PyErr_Format(PyExc_ValueError, "qkv: last dim %lld is not 3*D with D a multiple of "
                     "heads (num_heads) = %lld", (long long)D3, NH);
        return -1;
    }
    return 0;
}

/* attention_forward(qkv, heads) -> (out, att); attention_backward(dout, qkv, att, heads) ->
 * dqkv. precision "fp32" or "bf16" (bf16 GEMM operands, CUDA only). */
static PyObject *attention_op(PyObject *args, PyObject *kw, int backward) {
    static char *kf[] = {"qkv", "heads", "precision", "device", NULL};
    static char *kb[] = {"dout", "qkv", "att", "heads", "precision", "device", NULL};
    PyObject *od = NULL, *oq, *oa = NULL, *oprec = NULL, *odev = NULL, *ret = NULL;
    long long NH;
    PyArrayObject *qkv, *dout = NULL, *att = NULL, *out, *aux;
    const rd_backend *be;
    rd_call c = {0};
    int prec;
    int ok = backward ? PyArg_ParseTupleAndKeywords(args, kw, "OOOL|$OO", kb, &od, &oq, &oa, &NH,
                                                    &oprec, &odev)
                      : PyArg_ParseTupleAndKeywords(args, kw, "OL|$OO", kf, &oq, &NH, &oprec, &odev);
    if (!ok || rd_parse_device(odev, &be) < 0 || rd_parse_precision(oprec, "precision", &prec) < 0)
        return NULL;
    if (prec == RD_PREC_TF32) {
        PyErr_SetString(PyExc_ValueError, "precision: expected 'fp32' or 'bf16', got 'tf32'");
        return NULL;
    }
    IN(qkv, oq, "qkv", F32, 3, RD_ANY, RD_ANY, RD_ANY);
    if (check_heads(qkv, NH) < 0) goto done;
    const int64_t B = DIM(qkv, 0), L = DIM(qkv, 1), D = DIM(qkv, 2) / 3;
    if (backward) {
        IN(dout, od, "dout", F32, 3, B, L, D);
        IN(att, oa, "att", F32, 4, B, NH, L, L);
        NEW(out, 3, B, L, 3 * D);
    } else {
        NEW(out, 3, B, L, D);
    }
    /* att, or the backward's scratch (assigned before it is read; backend memory only) */
    npy_intp sa[4] = {B, NH, L, L};
    if (!(aux = backward ? rd_call_scratch(&c, 4, sa, F32) : rd_call_new(&c, 4, sa, F32)))
        goto done;
    if (new_ctx(&c, be, prec) < 0) goto done;
    RD_CALL_RUN(c, be, backward ? be->attention_backward(c.free_arg, DV(out), DV(aux), DV(dout),
                                                         DV(qkv), DV(att), B, L, D, NH)
                                : be->attention_forward(c.free_arg, DV(out), DV(aux), DV(qkv), B,
                                                        L, D, NH));
    ret = backward ? Py_NewRef((PyObject *)out) : PyTuple_Pack(2, out, aux);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_attention_forward(PyObject *s, PyObject *a, PyObject *k) {
    (void)s;
    return attention_op(a, k, 0);
}
static PyObject *py_attention_backward(PyObject *s, PyObject *a, PyObject *k) {
    (void)s;
    return attention_op(a, k, 1);
}

/* ---- elementwise: SiLU, GELU-tanh on arrays of any shape: forward(inp) or backward(dout, inp) */

typedef enum { SILU_F, SILU_B, GELU_F, GELU_B } ew_kind;

static rd_status ew_run(const rd_backend *be, ew_kind k, float *out, const float *a,
                        const float *b, int64_t n) {
    switch (k) {
    case SILU_F: return be->silu_forward(out, a, n);
    case SILU_B: return be->silu_backward(out, a, b, n);
    case GELU_F: return be->gelu_forward(out, a, n);
    default: return be->gelu_backward(out, a, b, n);
    }
}

static PyObject *elementwise(PyObject *args, PyObject *kw, ew_kind k) {
    static char *kf[] = {"inp", "device", NULL}, *kb[] = {"dout", "inp", "device", NULL};
    const int bwd = k == SILU_B || k == GELU_B;
    PyObject *o1, *o2 = NULL, *odev = NULL, *ret = NULL;
    PyArrayObject *a, *b = NULL, *out;
    const rd_backend *be;
    rd_call c = {0};
    int ok = bwd ? PyArg_ParseTupleAndKeywords(args, kw, "OO|$O", kb, &o1, &o2, &odev)
                 : PyArg_ParseTupleAndKeywords(args, kw, "O|$O", kf, &o1, &odev);
    if (!ok || rd_parse_device(odev, &be) < 0) return NULL;
    if (!PyArray_Check(o1)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray of dtype float32, got %s",
                     bwd ? "dout" : "inp", Py_TYPE(o1)->tp_name);
        return NULL;
    }
    const int nd = PyArray_NDIM((PyArrayObject *)o1);
    if (!(a = rd_call_in(&c, o1, bwd ? "dout" : "inp", F32, nd, NULL))) goto done;
    if (bwd && !(b = rd_call_in(&c, o2, "inp", F32, nd, PyArray_DIMS(a)))) goto done;
    if (!(out = rd_call_new(&c, nd, PyArray_DIMS(a), F32))) goto done;
    RD_CALL_RUN(c, be, ew_run(be, k, DV(out), DV(a), DV(b), (int64_t)PyArray_SIZE(a)));
    ret = Py_NewRef((PyObject *)out);
done:
    rd_call_end(&c);
    return ret;
}
static PyObject *py_silu_forward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return elementwise(a, k, SILU_F); }
static PyObject *py_silu_backward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return elementwise(a, k, SILU_B); }
static PyObject *py_gelu_forward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return elementwise(a, k, GELU_F); }
static PyObject *py_gelu_backward(PyObject *s, PyObject *a, PyObject *k) { (void)s; return elementwise(a, k, GELU_B); }

/* ---- label embedding: labels checked on the host (a device op indexes with them) ---------- */

static int check_labels(PyArrayObject *y, int64_t V) {
    const int64_t *p = (const int64_t *)PyArray_DATA(y);
    for (int64_t b = 0; b < DIM(y, 0); b++)
        if (p[b] < 0 || p[b] >= V) {
            PyErr_Format(PyExc_ValueError, "embedding: label y[%lld]=%lld outside [0, %lld]",
                         (long long)b, (long long)p[b], (long long)(V - 1));
            return -1;
        }
    return 0;
}

static PyObject *py_embedding_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"y", "table", "device", NULL};
    PyObject *oy, *ot, *odev = NULL, *ret = NULL;
    PyArrayObject *y, *tab, *out;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|$O", kws, &oy, &ot, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    IN(y, oy, "y", I64, 1, RD_ANY);
    IN(tab, ot, "table", F32, 2, RD_ANY, RD_ANY);
    if (check_labels(y, DIM(tab, 0)) < 0) goto done;
    NEW(out, 2, DIM(y, 0), DIM(tab, 1));
    RD_CALL_RUN(c, be, be->embedding_forward(DV(out), DV(y), DV(tab), DIM(y, 0), DIM(tab, 0),
                                             DIM(tab, 1)));
    ret = Py_NewRef((PyObject *)out);
done:
    rd_call_end(&c);
    return ret;
}

/* embedding_backward(dout, y, dtable): dtable accumulates in place. */
static PyObject *py_embedding_backward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"dout", "y", "dtable", "device", NULL};
    PyObject *od, *oy, *ot, *odev = NULL, *ret = NULL;
    PyArrayObject *dout, *y, *dtab;
    const rd_backend *be;
    rd_call c = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO|$O", kws, &od, &oy, &ot, &odev) ||
        rd_parse_device(odev, &be) < 0)
        return NULL;
    IN(y, oy, "y", I64, 1, RD_ANY);
    if (!(dtab = rd_call_out(&c, ot, "dtable", F32, 2, NULL))) goto done;
    IN(dout, od, "dout", F32, 2, DIM(y, 0), DIM(dtab, 1));
    if (check_labels(y, DIM(dtab, 0)) < 0) goto done;
    RD_CALL_RUN(c, be, be->embedding_backward(DV(dtab), DV(dout), DV(y), DIM(y, 0), DIM(dtab, 0),
                                              DIM(dtab, 1)));
    ret = Py_NewRef(Py_None);
done:
    rd_call_end(&c);
    return ret;
}

static PyMethodDef dit_methods[] = {
    {"dit_patchify", KW py_patchify, ARGS,
     "dit_patchify(img (B,C,H,W), p, order='ijc', device='cpu') -> tok (B,L,p*p*C)"},
    {"dit_unpatchify", KW py_unpatchify, ARGS,
     "dit_unpatchify(tok (B,L,p*p*C), C, H, W, p, order='ijc', device='cpu') -> img (B,C,H,W)"},
    {"dit_pos_embed", py_pos_embed, METH_VARARGS, "dit_pos_embed(gh, gw, D) -> pe (gh*gw, D)"},
    {"dit_timestep_embedding", KW py_timestep_embedding, ARGS,
     "dit_timestep_embedding(t (B,), dim=256, max_period=10000, device='cpu') -> (B, dim)"},
    {"dit_linear_forward", KW py_linear_forward, ARGS,
     "dit_linear_forward(inp (N,IC), W (OC,IC), b (OC,)=None, precision='fp32', device='cpu') "
     "-> out (N,OC)"},
    {"dit_linear_backward", KW py_linear_backward, ARGS,
     "dit_linear_backward(dout, inp, W, dW, db=None, precision='fp32', device='cpu') -> dinp; "
     "dW, db accumulate in place"},
    {"dit_layernorm_forward", KW py_layernorm_forward, ARGS,
     "dit_layernorm_forward(inp (N,D), device='cpu') -> (out (N,D), rstd (N,))"},
    {"dit_layernorm_backward", KW py_layernorm_backward, ARGS,
     "dit_layernorm_backward(dout, out, rstd, dinp_acc=None, device='cpu') -> dinp (N,D) "
     "(plus dinp_acc when given; dinp_acc is not modified)"},
    {"dit_modulate_forward", KW py_modulate_forward, ARGS,
     "dit_modulate_forward(inp (B,L,D), shift (B,S), scale (B,S), device='cpu') -> out; S >= D"},
    {"dit_modulate_backward", KW py_modulate_backward, ARGS,
     "dit_modulate_backward(dout, inp, scale, device='cpu') -> (dinp, dshift (B,S), dscale (B,S))"},
    {"dit_gated_residual_forward", KW py_gated_residual_forward, ARGS,
     "dit_gated_residual_forward(inp (B,L,D), h (B,L,D), gate (B,S), device='cpu') -> inp + gate*h"},
    {"dit_gated_residual_backward", KW py_gated_residual_backward, ARGS,
     "dit_gated_residual_backward(dout, h, gate, device='cpu') -> (dh, dgate (B,S))"},
    {"dit_attention_forward", KW py_attention_forward, ARGS,
     "dit_attention_forward(qkv (B,L,3D), heads, precision='fp32', device='cpu') -> "
     "(out (B,L,D), att (B,NH,L,L))"},
    {"dit_attention_backward", KW py_attention_backward, ARGS,
     "dit_attention_backward(dout (B,L,D), qkv, att, heads, precision='fp32', device='cpu') -> "
     "dqkv (B,L,3D)"},
    {"dit_silu_forward", KW py_silu_forward, ARGS, "dit_silu_forward(inp, device='cpu') -> out"},
    {"dit_silu_backward", KW py_silu_backward, ARGS,
     "dit_silu_backward(dout, inp, device='cpu') -> dinp"},
    {"dit_gelu_forward", KW py_gelu_forward, ARGS, "dit_gelu_forward(inp, device='cpu') -> out"},
    {"dit_gelu_backward", KW py_gelu_backward, ARGS,
     "dit_gelu_backward(dout, inp, device='cpu') -> dinp"},
    {"dit_embedding_forward", KW py_embedding_forward, ARGS,
     "dit_embedding_forward(y (B,) int64, table (V,D), device='cpu') -> (B,D)"},
    {"dit_embedding_backward", KW py_embedding_backward, ARGS,
     "dit_embedding_backward(dout (B,D), y, dtable (V,D), device='cpu'): dtable accumulates in place"},
    {NULL, NULL, 0, NULL}};

int rd_bind_dit(PyObject *m) { return PyModule_AddFunctions(m, dit_methods); }
