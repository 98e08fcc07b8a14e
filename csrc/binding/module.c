/* module.c — racedit._C: module init. Registers SciPy's BLAS sgemm with the C core,
 * then the functions of each area (route, moe, losses, dit, model, train, cuda). */
#define RD_BIND_MAIN
#include "bind.h"

#include <string.h>

#ifdef RD_HAVE_CUDA
int rd_cuda_device_count(void);
const char *rd_cuda_runtime_version(void);
int rd_bind_cuda(PyObject *m);
#endif

void *rd_scipy_sgemm(void) {
    PyObject *mod = PyImport_ImportModule("scipy.linalg.cython_blas"), *capi = NULL;
    if (mod) capi = PyObject_GetAttrString(mod, "__pyx_capi__");
    Py_XDECREF(mod);
    PyObject *cap = capi ? PyDict_GetItemString(capi, "sgemm") : NULL; /* borrowed */
    void *fn = cap && PyCapsule_CheckExact(cap) ? PyCapsule_GetPointer(cap, PyCapsule_GetName(cap))
                                                : NULL;
    Py_XDECREF(capi);
    return fn;
}

static int register_sgemm(void) {
    void *fn = rd_scipy_sgemm();
    if (!fn && !PyErr_Occurred())
        PyErr_SetString(PyExc_ImportError, "racedit: scipy.linalg.cython_blas has no 'sgemm' capsule");
    if (!fn) return -1;
    rd_set_sgemm((rd_sgemm_fn)fn);
    return 0;
}

static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    PyObject *v;
#ifdef _OPENMP
    PyDict_SetItemString(d, "openmp", Py_True);
    v = PyLong_FromLong(_OPENMP);
    PyDict_SetItemString(d, "openmp_version", v); Py_XDECREF(v);
#else
    PyDict_SetItemString(d, "openmp", Py_False);
#endif
    v = PyLong_FromLong(rd_num_threads());
    PyDict_SetItemString(d, "num_threads", v); Py_XDECREF(v);
    PyDict_SetItemString(d, "sgemm_registered", rd_have_sgemm() ? Py_True : Py_False);
#ifdef RD_HAVE_CUDA
    PyDict_SetItemString(d, "cuda", Py_True);
    v = PyUnicode_FromString(rd_cuda_runtime_version());
    PyDict_SetItemString(d, "cuda_runtime", v); Py_XDECREF(v);
#else
    PyDict_SetItemString(d, "cuda", Py_False);
#endif
#ifdef RD_BUILD_ID
    v = PyUnicode_FromString(RD_BUILD_ID);
#else
    v = Py_None, Py_INCREF(v);
#endif
    PyDict_SetItemString(d, "build_id", v); Py_XDECREF(v);
    return d;
}

static PyObject *py_cuda_device_count(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
#ifdef RD_HAVE_CUDA
    return PyLong_FromLong(rd_cuda_device_count());
#else
    return PyLong_FromLong(0);
#endif
}

/* check_pool() -> dict: the checking backend's pool (backend.h's rd_check_report);
 * check_pool(reset=True) also forgets the misuses and the transfers counted so far. */
static PyObject *py_check_pool(PyObject *self, PyObject *args, PyObject *kw) {
    (void)self;
    static char *kws[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|p", kws, &reset)) return NULL;
    rd_check_report r;
    rd_check_pool_report(&r);
    if (reset) rd_check_pool_reset();
    return Py_BuildValue("{s:L,s:L,s:L,s:s,s:L,s:L,s:L,s:L}", "live", (long long)r.live,
                         "bytes", (long long)r.bytes, "errors", (long long)r.errors,
                         "first_error", r.first_error, "uploads", (long long)r.uploads,
                         "upload_bytes", (long long)r.upload_bytes, "downloads",
                         (long long)r.downloads, "download_bytes", (long long)r.download_bytes);
}

/* check_probe(kind) -> the message of the checking backend's refusal of a mix-up made on
 * purpose (for its tests): "host", a host array handed to an op; "upload", backend memory
 * uploaded from as if it were a host array; "guard", bytes written past an allocation
 * (reported when it is freed). The misuses seen before are forgotten first. */
static PyObject *py_check_probe(PyObject *self, PyObject *args) {
    (void)self;
    const char *kind;
    if (!PyArg_ParseTuple(args, "s", &kind)) return NULL;
    const rd_backend *be = &rd_backend_check;
    rd_check_pool_reset();
    float host[4] = {0}, *dev = NULL;
    rd_status s = be->alloc((void **)&dev, sizeof host);
    if (s) return rd_raise(s);
    if (!strcmp(kind, "host")) s = be->add(dev, host, 4);
    else if (!strcmp(kind, "upload")) s = be->upload(dev, dev, sizeof host);
    else if (!strcmp(kind, "guard")) ((char *)dev)[sizeof host] = 0;
    be->free(dev);
    rd_check_report r;
    rd_check_pool_report(&r);
    return PyUnicode_FromString(s ? rd_last_error() : r.first_error);
}

static PyMethodDef core_methods[] = {
    {"check_probe", py_check_probe, METH_VARARGS,
     "check_probe(kind) -> the checking backend's message for a mix-up made on purpose."},
    {"check_pool", (PyCFunction)(void (*)(void))py_check_pool, METH_VARARGS | METH_KEYWORDS,
     "check_pool(reset=False) -> the checking backend's pool: live allocations, bytes, errors, "
     "uploads and downloads (count, bytes)."},
    {"build_info", py_build_info, METH_NOARGS, "What the C core was built with."},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS,
     "Number of CUDA devices usable by the compiled CUDA code (0 when none or not built)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "racedit._C",
                                       "racedit's C core (CPU) and CUDA kernels.", -1,
                                       core_methods};

PyMODINIT_FUNC PyInit__C(void) {
    import_array();
    if (register_sgemm() < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (rd_bind_route(m) < 0 || rd_bind_moe(m) < 0 || rd_bind_losses(m) < 0 ||
        rd_bind_dit(m) < 0 || rd_bind_model(m) < 0 || rd_bind_train(m) < 0 ||
        rd_bind_dist(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#ifdef RD_HAVE_CUDA
    if (rd_bind_cuda(m) < 0) { Py_DECREF(m); return NULL; }
#endif
    return m;
}
