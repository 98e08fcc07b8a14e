/* bind_cuda.c — what only the CUDA backend has (racedit._C.cuda_*): the TF32 and expert-GEMM
 * knobs, the cuBLAS information and the device-resident MoE benchmark. Every op is a
 * device="cuda" call of the one binding function of its name. Without RD_HAVE_CUDA nothing
 * is registered and racedit.cuda raises RuntimeError. */
#include "bind.h"

#ifdef RD_HAVE_CUDA

#include <string.h>

static int need_device(void) { return rd_device_ready(&rd_backend_cuda); }

/* ---- knobs, info, benchmark --------------------------------------------------------- */
static PyObject *py_set_tf32(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o = Py_None;
    if (!PyArg_ParseTuple(args, "|O:cuda_tf32", &o)) return NULL;
    int prev = rd_cuda_get_tf32();
    if (o != Py_None) {
        int t = PyObject_IsTrue(o);
        if (t < 0) return NULL;
        rd_cuda_set_tf32(t);
    }
    return PyBool_FromLong(prev);
}

static PyObject *py_set_expert_gemm(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o = Py_None;
    if (!PyArg_ParseTuple(args, "|O:cuda_expert_gemm", &o)) return NULL;
    int prev = rd_cuda_get_expert_gemm();
    if (o != Py_None) {
        int64_t m;
        if (rd_parse_int(o, "mode", &m) < 0) return NULL;
        if (m < 0 || m > 2) {
            PyErr_Format(PyExc_ValueError, "mode: expected 0 (GEMM loop), 1 (grouped) or 2 (loop on "
                         "side streams), got %lld", (long long)m);
            return NULL;
        }
        if (m == 1 && !rd_cuda_have_grouped_gemm()) {
            PyErr_Format(PyExc_ValueError, "mode: cublasGemmGroupedBatchedEx is not in this cuBLAS (%d)",
                         rd_cuda_cublas_version());
            return NULL;
        }
        rd_cuda_set_expert_gemm((int)m);
    }
    return PyLong_FromLong(prev);
}

static PyObject *py_cuda_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    static const char *names[4] = {"fp32->fp32", "fp32->bf16", "bf16->fp32", "bf16->bf16"};
    PyObject *refused = PyList_New(0);
    if (!refused) return NULL;
    int mask = rd_cuda_grouped_refused_mask();
    for (int i = 0; i < 4; i++) {
        if (!(mask & (1 << i))) continue;
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s || PyList_Append(refused, s) < 0) {
            Py_XDECREF(s);
            Py_DECREF(refused);
            return NULL;
        }
        Py_DECREF(s);
    }
    return Py_BuildValue("{s:i,s:O,s:s,s:i,s:i,s:N}", "cublas_version", rd_cuda_cublas_version(),
                         "grouped_gemm", rd_cuda_have_grouped_gemm() ? Py_True : Py_False,
                         "runtime", rd_cuda_runtime_version(), "devices", rd_cuda_device_count(),
                         "grouped_fallbacks", rd_cuda_grouped_fallbacks(),
                         "grouped_refused", refused);
}

/* cuda_bench_moe(x, params, dy, iters, precision='fp32', **settings) -> dict of ms. */
static PyObject *py_bench_moe(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    PyObject *o_x, *o_p, *o_dy, *oprec = NULL, *ret = NULL;
    int iters, prec;
    PyArrayObject *x = NULL, *params = NULL, *dyin = NULL;
    rd_moe_cfg cfg = {0};
    cfg.beta = 0.99f, cfg.plr_weight = 1.0f, cfg.strategy = RD_ROUTE_RACE;
    if (!PyArg_ParseTuple(args, "OOOi|O:cuda_bench_moe", &o_x, &o_p, &o_dy, &iters, &oprec) ||
        rd_parse_precision(oprec, "precision", &prec) < 0 || rd_parse_moe_settings(kw, &cfg, 1) < 0)
        return NULL;
    if (iters < 1) return PyErr_Format(PyExc_ValueError, "iters: expected >= 1, got %d", iters);
    int64_t sizes[RD_MOE_NPARAM];
    npy_intp np[1] = {(npy_intp)rd_moe_param_sizes(sizes, &cfg)}, sx[3] = {RD_ANY, RD_ANY, cfg.D};
    if (!(x = rd_in_array(o_x, "x", NPY_FLOAT32, 3, sx))) return NULL;
    if (!(params = rd_in_array(o_p, "params", NPY_FLOAT32, 1, np))) goto done;
    if (!(dyin = rd_in_array(o_dy, "dy", NPY_FLOAT32, 3, PyArray_DIMS(x)))) goto done;
    if (need_device() < 0) goto done;
    rd_cuda_bench_result r;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS
    s = rd_cuda_bench_moe(&r, PyArray_DATA(x), PyArray_DATA(params), PyArray_DATA(dyin), &cfg,
                          PyArray_DIM(x, 0), PyArray_DIM(x, 1), iters, prec);
    Py_END_ALLOW_THREADS
    if (s != RD_OK) { rd_raise(s); goto done; }
    ret = Py_BuildValue("{s:d,s:d,s:d,s:d,s:d,s:d,s:L}", "route_ms", r.route_ms, "fwd_ms", r.fwd_ms,
                        "fwdbwd_ms", r.fwdbwd_ms, "experts_fwdbwd_ms", r.experts_fwdbwd_ms,
                        "dense_fwd_ms", r.dense_fwd_ms, "dense_fwdbwd_ms", r.dense_fwdbwd_ms,
                        "P", (long long)r.P);
done:
    Py_XDECREF(x);
    Py_XDECREF(params);
    Py_XDECREF(dyin);
    return ret;
}

static PyMethodDef cuda_methods[] = {
    {"cuda_tf32", py_set_tf32, METH_VARARGS, "Read / set TF32 GEMMs; returns the previous value."},
    {"cuda_expert_gemm", py_set_expert_gemm, METH_VARARGS, "Read / set the expert GEMM mode."},
    {"cuda_info", py_cuda_info, METH_NOARGS, "cuBLAS version, grouped GEMM, runtime, devices."},
    {"cuda_bench_moe", (PyCFunction)(void (*)(void))py_bench_moe, METH_VARARGS | METH_KEYWORDS,
     "Device-resident MoE timings (dict of ms)."},
    {NULL, NULL, 0, NULL}};

int rd_bind_cuda(PyObject *m) { return PyModule_AddFunctions(m, cuda_methods); }

#else

int rd_bind_cuda(PyObject *m) { (void)m; return 0; }

#endif
