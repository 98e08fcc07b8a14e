/* bind_model.c — the whole model behind an opaque capsule (racedit._C.model_*), which
 * racedit.RaceDiT wraps, on any device: the model graph of csrc/core with the table of the
 * device it was made on. Inputs and outputs are host arrays; the model's five buffers
 * (parameters, gradients, AdamW moments, EMA) live in the device's memory and are handed
 * out as live NumPy views on the CPU, as copies elsewhere. */
#include "bind.h"

#include <math.h>
#include <string.h>

#define F32 NPY_FLOAT32
#define KW (PyCFunction)(void (*)(void))
#define ARGS METH_VARARGS | METH_KEYWORDS

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

static model_box *box_of(PyObject *cap) {
    return rd_capsule_ptr(cap, CAPSULE_NAME, "model", "a capsule from racedit._C.model_new()");
}

/* The box for a call that only reads what construction fixed (layout, sizes). */
static model_box *get_box(PyObject *cap) {
    model_box *box = box_of(cap);
    if (box && box->busy) {
        PyErr_SetString(PyExc_RuntimeError, "model: in use by another thread");
        return NULL;
    }
    return box;
}

/* The box claimed for this call (give it back with rd_give(&box->busy)), or NULL with the
 * exception: taken before anything that may release the GIL. */
static model_box *take_box(PyObject *cap) {
    model_box *box = box_of(cap);
    if (box && rd_take(&box->busy, "model") < 0) return NULL;
    return box;
}

rd_model *rd_bind_take_model(PyObject *cap, rd_busy **busy) {
    model_box *box = take_box(cap);
    if (!box) return NULL;
    *busy = &box->busy;
    return box->m;
}

/* model_new(depth, hidden, heads, patch, input_size, in_channels, out_channels, num_classes,
 * device='cpu', precision='fp32', **moe settings (rd_parse_moe_settings; num_experts=0:
 * dense blocks)) -> capsule. */
static PyObject *py_model_new(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    long long depth, D, NH, p, S, C, Co, ncls;
    if (!PyArg_ParseTuple(args, "LLLLLLLL:model_new", &depth, &D, &NH, &p, &S, &C, &Co, &ncls))
        return NULL;
    PyObject *odev, *oprec, *cap = NULL, *settings = rd_split_settings(kw, &odev, &oprec);
    if (!settings) return NULL;
    rd_model_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.depth = depth, cfg.D = D, cfg.NH = NH, cfg.patch = p, cfg.input_size = S;
    cfg.in_channels = C, cfg.out_channels = Co, cfg.num_classes = ncls;
    rd_moe_cfg *mc = &cfg.moe;
    mc->D = D, mc->k = 1, mc->strategy = RD_ROUTE_RACE, mc->gating = RD_GATE_IDENTITY;
    mc->beta = 0.99f, mc->plr_weight = 1.0f, mc->sim_weight = 0.01f;
    const rd_backend *be;
    int prec;
    model_box *box = NULL;
    if (rd_parse_device(odev, &be) < 0 || rd_parse_precision(oprec, "precision", &prec) < 0 ||
        rd_parse_moe_settings(settings, mc, 0) < 0 || /* rd_model_new checks */
        rd_device_ready(be) < 0)
        goto done;
    if (!(box = PyMem_Calloc(1, sizeof *box))) { PyErr_NoMemory(); goto done; }
    RD_RUN(rd_model_new(&box->m, &cfg, be));
    RD_RUN(rd_model_set_precision(box->m, prec));
    if ((cap = PyCapsule_New(box, CAPSULE_NAME, capsule_free))) box = NULL;
done:
    if (box) {
        rd_model_free(box->m);
        PyMem_Free(box);
    }
    Py_DECREF(settings);
    return cap;
}

/* [(name, offset, shape), ...] in buffer order. */
static PyObject *py_model_layout(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = get_box(cap);
    if (!box) return NULL;
    const int n = rd_model_num_tensors(box->m);
    PyObject *list = PyList_New(n);
    for (int i = 0; list && i < n; i++) {
        const rd_tensor_info *t = rd_model_tensor(box->m, i);
        PyObject *shape = PyTuple_New(t->ndim);
        for (int d = 0; shape && d < t->ndim; d++)
            PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(t->shape[d]));
        PyObject *item = shape ? Py_BuildValue("(sLN)", t->name, (long long)t->offset, shape) : NULL;
        if (!item) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *py_model_num_params(PyObject *self, PyObject *cap) {
    (void)self;
    model_box *box = get_box(cap);
    return box ? PyLong_FromLongLong(rd_model_num_params(box->m)) : NULL;
}

static int parse_which(int which) {
    if (which >= 0 && which < RD_MODEL_NBUF) return 0;
    PyErr_Format(PyExc_ValueError, "which: expected 0..%d (params, grads, adam_m, adam_v, ema), "
                 "got %d", RD_MODEL_NBUF - 1, which);
    return -1;
}

/* model_buffer(model, which, address=False) -> (num_params,) float32: on the CPU a live,
 * writeable view of the model's buffer (it keeps the model alive), elsewhere a copy; with
 * `address`, the int address of the buffer in the model's own memory instead (valid while
 * the model lives: the buffers are allocated once, by model_new). */
static PyObject *py_model_buffer(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    int which, address = 0;
    if (!PyArg_ParseTuple(args, "Oi|p:model_buffer", &cap, &which, &address) ||
        parse_which(which) < 0)
        return NULL;
    model_box *box = box_of(cap);
    if (!box) return NULL;
    const rd_backend *be = rd_model_backend(box->m);
    npy_intp n[1] = {(npy_intp)rd_model_num_params(box->m)};
    float *buf = rd_model_buffer(box->m, which);
    if (address) return PyLong_FromVoidPtr(buf);
    if (!be->host_memory) { /* a copy, taken while no other call works on the model */
        if (rd_take(&box->busy, "model") < 0) return NULL;
        PyObject *copy = rd_download_array(be, buf, 1, n, F32);
        rd_give(&box->busy);
        return copy;
    }
    PyObject *view = PyArray_SimpleNewFromData(1, n, F32, buf);
    if (view && PyArray_SetBaseObject((PyArrayObject *)view, Py_NewRef(cap)) < 0) Py_CLEAR(view);
    return view;
}

/* model_set_buffer(model, which, values (num_params,) float32): the buffer = values. */
static PyObject *py_model_set_buffer(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ov, *ret = NULL;
    int which;
    if (!PyArg_ParseTuple(args, "OiO:model_set_buffer", &cap, &which, &ov) || parse_which(which) < 0)
        return NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    rd_call c = {.busy = &box->busy};
    PyArrayObject *a;
    RD_IN(c, a, ov, "values", F32, 1, rd_model_num_params(box->m));
    RD_RUN(rd_model_backend(box->m)->upload(rd_model_buffer(box->m, which), PyArray_DATA(a),
                                            (size_t)PyArray_NBYTES(a)));
    ret = Py_NewRef(Py_None);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_model_zero_grad(PyObject *self, PyObject *cap) {
    (void)self;
    PyObject *ret = NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    const size_t bytes = (size_t)rd_model_num_params(box->m) * sizeof(float);
    RD_RUN(rd_model_backend(box->m)->memset(rd_model_buffer(box->m, RD_BUF_GRADS), 0, bytes));
    ret = Py_NewRef(Py_None);
done:
    rd_give(&box->busy);
    return ret;
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
    PyObject *cap, *ret = NULL;
    long long mb;
    int fixed;
    if (!PyArg_ParseTuple(args, "OLp", &cap, &mb, &fixed)) return NULL;
    if (mb < 1) return PyErr_Format(PyExc_ValueError, "max_batch: expected >= 1, got %lld", mb);
    model_box *box = take_box(cap);
    if (!box) return NULL;
    RD_RUN(rd_model_reserve(box->m, mb, fixed));
    ret = Py_NewRef(Py_None);
done:
    rd_give(&box->busy);
    return ret;
}

/* The inputs x (B,C,S,S) f32, t (B,) f32, y (B,) i64 and an optional (B,C,S,S) f32 `zname`
 * into a[0..3], held by `c`; B >= 1. */
static int model_inputs(rd_call *c, const rd_model *m, PyObject *ox, PyObject *ot, PyObject *oy,
                        PyObject *oz, const char *zname, PyArrayObject **a, int64_t *B) {
    const rd_model_cfg *cfg = rd_model_config(m);
    const npy_intp S = (npy_intp)cfg->input_size, C = (npy_intp)cfg->in_channels;
    npy_intp sx[4] = {RD_ANY, C, S, S};
    if (!(a[0] = rd_call_in(c, ox, "x", F32, 4, sx))) return -1;
    *B = PyArray_DIM(a[0], 0);
    if (*B < 1) {
        PyErr_SetString(PyExc_ValueError, "x: expected a batch of at least 1 image");
        return -1;
    }
    npy_intp sb[1] = {(npy_intp)*B}, sz[4] = {(npy_intp)*B, C, S, S};
    if (!(a[1] = rd_call_in(c, ot, "t", F32, 1, sb))) return -1;
    if (!(a[2] = rd_call_in(c, oy, "y", NPY_INT64, 1, sb))) return -1;
    if (oz && oz != Py_None && !(a[3] = rd_call_in(c, oz, zname, F32, 4, sz))) return -1;
    return 0;
}

#define FP(a) ((float *)PyArray_DATA(a))
#define IP(a) ((int64_t *)PyArray_DATA(a))

/* out (B,Co,S,S) of x, t, y (and plr_target): rd_model_forward, or with `infer`
 * rd_model_infer (plr_target None). */
static PyObject *model_run(PyObject *cap, PyObject *ox, PyObject *ot, PyObject *oy,
                           PyObject *oplr, int training, int infer) {
    PyObject *ret = NULL;
    PyArrayObject *a[4] = {0}, *out;
    int64_t B;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    rd_call c = {.busy = &box->busy};
    const rd_model_cfg *cfg = rd_model_config(box->m);
    if (model_inputs(&c, box->m, ox, ot, oy, oplr, "plr_target", a, &B) < 0) goto done;
    RD_NEW(c, out, F32, 4, B, cfg->out_channels, cfg->input_size, cfg->input_size);
    RD_RUN(infer ? rd_model_infer(box->m, FP(out), FP(a[0]), FP(a[1]), IP(a[2]), B)
              : rd_model_forward(box->m, FP(out), FP(a[0]), FP(a[1]), IP(a[2]),
                                 a[3] ? FP(a[3]) : NULL, B, training));
    ret = Py_NewRef((PyObject *)out);
done:
    rd_call_end(&c);
    return ret;
}

static PyObject *py_model_forward(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"model", "x", "t", "y", "plr_target", "training", NULL};
    PyObject *cap, *ox, *ot, *oy, *oplr = Py_None;
    int training = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO|Op", kws, &cap, &ox, &ot, &oy, &oplr,
                                     &training))
        return NULL;
    return model_run(cap, ox, ot, oy, oplr, training, 0);
}

/* model_infer(model, x, t, y) -> out: rd_model_infer (eval mode, no backward). */
static PyObject *py_model_infer(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *ox, *ot, *oy;
    if (!PyArg_ParseTuple(args, "OOOO", &cap, &ox, &ot, &oy)) return NULL;
    return model_run(cap, ox, ot, oy, Py_None, 0, 1);
}

/* model_backward(model, dout): the gradients accumulate. */
static PyObject *py_model_backward(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *od, *ret = NULL;
    PyArrayObject *dout;
    if (!PyArg_ParseTuple(args, "OO", &cap, &od)) return NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    rd_call c = {.busy = &box->busy};
    const rd_model_cfg *cfg = rd_model_config(box->m);
    const int64_t B = rd_model_last_batch(box->m), S = cfg->input_size;
    if (B == 0) {
        PyErr_SetString(PyExc_RuntimeError, "backward called before forward");
        goto done;
    }
    RD_IN(c, dout, od, "dout", F32, 4, B, cfg->out_channels, S, S);
    RD_RUN(rd_model_backward(box->m, FP(dout)));
    ret = Py_NewRef(Py_None);
done:
    rd_call_end(&c);
    return ret;
}

/* The step's result: loss (None for optimizer_step), aux, grad_norm (None when not
 * computed), step, updated. */
static PyObject *step_result(const rd_model_step_out *r, int has_loss, int has_norm) {
    PyObject *loss = has_loss ? PyFloat_FromDouble(r->loss) : Py_NewRef(Py_None);
    PyObject *gn = has_norm ? PyFloat_FromDouble(r->grad_norm) : Py_NewRef(Py_None);
    return Py_BuildValue("{s:N,s:d,s:N,s:L,s:O}", "loss", loss, "aux", r->aux, "grad_norm", gn,
                         "step", (long long)r->step, "updated", r->updated ? Py_True : Py_False);
}


/* model_train_step(model, x, t, y, target, *, lr, beta1, beta2, eps, weight_decay,
 * max_grad_norm, ema_decay) -> dict: rd_model_train_step. */
static PyObject *py_model_train_step(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    PyObject *cap, *ox, *ot, *oy, *oz, *ret = NULL;
    PyArrayObject *a[4] = {0};
    rd_model_opt o;
    rd_model_step_out r;
    int64_t B;
    static char *kws[] = {"model", "x", "t", "y", "target", "lr", "beta1", "beta2", "eps",
                          "weight_decay", "max_grad_norm", "ema_decay", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOO$ddddddd:model_train_step", kws, &cap, &ox,
                                     &ot, &oy, &oz, &o.lr, &o.beta1, &o.beta2, &o.eps,
                                     &o.weight_decay, &o.max_grad_norm, &o.ema_decay))
        return NULL;
    if (oz == Py_None) {
        PyErr_SetString(PyExc_TypeError, "target: expected a float32 array, got None");
        return NULL;
    }
    model_box *box = take_box(cap);
    if (!box) return NULL;
    rd_call c = {.busy = &box->busy};
    if (model_inputs(&c, box->m, ox, ot, oy, oz, "target", a, &B) < 0) goto done;
    RD_RUN(rd_model_train_step(box->m, &r, FP(a[0]), FP(a[1]), IP(a[2]), FP(a[3]), B, &o));
    ret = step_result(&r, 1, o.max_grad_norm > 0.0);
done:
    rd_call_end(&c);
    return ret;
}

/* model_optimizer_step(model, *, lr, beta1, ..., ema_decay) -> dict: rd_model_optimizer_step. */
static PyObject *py_model_optimizer_step(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    PyObject *cap, *ret = NULL;
    rd_model_opt o;
    rd_model_step_out r;
    static char *kws[] = {"model", "lr", "beta1", "beta2", "eps", "weight_decay",
                          "max_grad_norm", "ema_decay", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O$ddddddd:model_optimizer_step", kws, &cap, &o.lr,
                                     &o.beta1, &o.beta2, &o.eps, &o.weight_decay,
                                     &o.max_grad_norm, &o.ema_decay))
        return NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    RD_RUN(rd_model_optimizer_step(box->m, &r, &o));
    ret = step_result(&r, 0, o.max_grad_norm > 0.0);
done:
    rd_give(&box->busy);
    return ret;
}

/* model_step(model[, step]) -> AdamW steps taken (before setting). */
static PyObject *py_model_step(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *os = NULL, *ret = NULL;
    int64_t s = 0;
    if (!PyArg_ParseTuple(args, "O|O:model_step", &cap, &os) ||
        (os && rd_parse_int(os, "step", &s) < 0))
        return NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    const long long prev = (long long)rd_model_get_step(box->m);
    if (os) RD_RUN(rd_model_set_step(box->m, s));
    ret = PyLong_FromLongLong(prev);
done:
    rd_give(&box->busy);
    return ret;
}

/* model_precision(model, precision): the GEMM precision (rd_model_set_precision). */
static PyObject *py_model_precision(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *oprec, *ret = NULL;
    int prec;
    if (!PyArg_ParseTuple(args, "OO:model_precision", &cap, &oprec) ||
        rd_parse_precision(oprec, "precision", &prec) < 0)
        return NULL;
    model_box *box = take_box(cap);
    if (!box) return NULL;
    RD_RUN(rd_model_set_precision(box->m, prec));
    ret = Py_NewRef(Py_None);
done:
    rd_give(&box->busy);
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
static int get_layer(PyObject *cap, long long l, model_box **box, void **st) {
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

/* model_moe_get(model, layer, name) -> what MoE block `layer`'s last forward left
 * (rd_moe_get: the names and the aux dict of racedit.MoE). */
static PyObject *py_model_moe_get(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap;
    long long l;
    const char *name;
    model_box *box;
    void *st;
    if (!PyArg_ParseTuple(args, "OLs", &cap, &l, &name) || get_layer(cap, l, &box, &st) < 0)
        return NULL;
    PyObject *ret = rd_moe_get(rd_model_backend(box->m), st, name);
    rd_give(&box->busy);
    return ret;
}

/* model_threshold(model, layer[, tau]) -> MoE block `layer`'s thresholds (float32 (ntau,),
 * None when unset), before setting them to tau (a number or 1-D values; None: forget them)
 * when given. */
static PyObject *py_model_threshold(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *cap, *otau = NULL, *ret = NULL;
    PyArrayObject *a = NULL;
    long long l;
    model_box *box;
    void *st;
    if (!PyArg_ParseTuple(args, "OL|O", &cap, &l, &otau) ||
        (otau && rd_parse_thresholds(otau, "tau", &a) < 0))
        return NULL;
    if (get_layer(cap, l, &box, &st) < 0) { Py_XDECREF(a); return NULL; }
    const rd_backend *be = rd_model_backend(box->m);
    rd_moe_view v;
    RD_RUN(be->moe_view(st, &v));
    if (!(ret = rd_thresholds_of(&v))) goto done;
    rd_status s = otau ? be->moe_set_threshold(st, a ? (const float *)PyArray_DATA(a) : NULL,
                                               a ? (int64_t)PyArray_SIZE(a) : 0)
                       : RD_OK;
    if (s) { Py_CLEAR(ret); rd_raise(s); }
done:
    Py_XDECREF(a);
    rd_give(&box->busy);
    return ret;
}

static PyMethodDef model_methods[] = {
    {"model_new", KW py_model_new, ARGS,
     "model_new(depth, hidden, heads, patch, input_size, in_channels, out_channels, "
     "num_classes, device='cpu', precision='fp32', num_experts=0, k=1, expert_hidden=0, "
     "strategy='race', gating='identity', beta=0.99, eval_topk=False, plr_weight=1, "
     "sim_weight=0.01, balance_weight=0) -> capsule"},
    {"model_layout", py_model_layout, METH_O, "model_layout(model) -> [(name, offset, shape)]"},
    {"model_num_params", py_model_num_params, METH_O, "model_num_params(model) -> int"},
    {"model_buffer", py_model_buffer, METH_VARARGS,
     "model_buffer(model, which, address=False) -> buffer `which` (0 params, 1 grads, "
     "2 adam_m, 3 adam_v, 4 ema): a live view on the CPU, a copy elsewhere; with address, "
     "its int address in the model's memory (valid while the model lives)"},
    {"model_set_buffer", py_model_set_buffer, METH_VARARGS,
     "model_set_buffer(model, which, values): buffer `which` = values"},
    {"model_zero_grad", py_model_zero_grad, METH_O, "model_zero_grad(model): gradients = 0"},
    {"model_batch", py_model_batch, METH_O, "model_batch(model) -> (max_batch, last_batch)"},
    {"model_reserve", py_model_reserve, METH_VARARGS, "model_reserve(model, max_batch, fixed)"},
    {"model_branch_norms", py_model_branch_norms, METH_O,
     "model_branch_norms(model) -> (depth, 2) mean norms of the gated attention / FFN outputs"},
    {"model_forward", KW py_model_forward, ARGS,
     "model_forward(model, x, t, y, plr_target=None, training=True) -> out"},
    {"model_infer", py_model_infer, METH_VARARGS,
     "model_infer(model, x, t, y) -> out: eval-mode forward keeping nothing for backward"},
    {"model_infer_release", py_model_infer_release, METH_O,
     "model_infer_release(model): free the inference activations"},
    {"model_infer_batch", py_model_infer_batch, METH_O,
     "model_infer_batch(model) -> batch the inference activations are allocated for (0: none)"},
    {"model_backward", py_model_backward, METH_VARARGS,
     "model_backward(model, dout): the gradients accumulate"},
    {"model_train_step", KW py_model_train_step, ARGS,
     "model_train_step(model, x, t, y, target, *, lr, beta1, beta2, eps, weight_decay, "
     "max_grad_norm, ema_decay) -> {loss, aux, grad_norm, step, updated}"},
    {"model_optimizer_step", KW py_model_optimizer_step, ARGS,
     "model_optimizer_step(model, *, lr, beta1, beta2, eps, weight_decay, max_grad_norm, "
     "ema_decay) -> {loss: None, aux, grad_norm, step, updated}"},
    {"model_step", py_model_step, METH_VARARGS, "model_step(model[, step]) -> AdamW steps taken"},
    {"model_precision", py_model_precision, METH_VARARGS, "model_precision(model, precision)"},
    {"model_moe_get", py_model_moe_get, METH_VARARGS,
     "model_moe_get(model, layer, name) -> a copy of what MoE block `layer`'s last forward "
     "left (the names of moe_get)"},
    {"model_threshold", py_model_threshold, METH_VARARGS,
     "model_threshold(model, layer[, tau or None]) -> the thresholds (None: unset), then set"},
    {NULL, NULL, 0, NULL}};

int rd_bind_model(PyObject *m) { return PyModule_AddFunctions(m, model_methods); }
