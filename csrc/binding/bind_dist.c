/* bind_dist.c — the GPU side of data-parallel training for racedit.distributed: the rank's
 * device, and NCCL's all-reduce of a model's gradient buffer in place on the device
 * (racedit._C.cuda_select_device, nccl_*). A build without CUDA or NCCL keeps the names
 * and raises RuntimeError saying what is missing. */
#include "bind.h"

#include <string.h>

#include "../backend.h"
#include "../dist.h"

#if defined(RD_HAVE_CUDA) && defined(RD_HAVE_NCCL)
#define HAVE_NCCL 1
#else
#define HAVE_NCCL 0
#endif

static PyObject *py_nccl_built(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
#if HAVE_NCCL
    return Py_BuildValue("(Oi)", Py_True, rd_nccl_version());
#else
    return Py_BuildValue("(Oi)", Py_False, 0);
#endif
}

#if !HAVE_NCCL
static PyObject *no_nccl(PyObject *self, PyObject *args) {
    (void)self, (void)args;
#ifdef RD_HAVE_CUDA
    PyErr_SetString(PyExc_RuntimeError, "racedit was built without NCCL (pip install "
                    "nvidia-nccl-cu13, then rebuild racedit)");
#else
    PyErr_SetString(PyExc_RuntimeError, "racedit was built without CUDA");
#endif
    return NULL;
}
#endif

#ifdef RD_HAVE_CUDA
/* cuda_select_device(local_rank) -> the device now current (local_rank modulo the count). */
static PyObject *py_cuda_select_device(PyObject *self, PyObject *args) {
    (void)self;
    int local_rank, device = -1;
    if (!PyArg_ParseTuple(args, "i:cuda_select_device", &local_rank)) return NULL;
    if (local_rank < 0)
        return PyErr_Format(PyExc_ValueError, "local_rank: expected >= 0, got %d", local_rank);
    rd_status s = rd_cuda_select_device(local_rank, &device);
    return s ? rd_raise(s) : PyLong_FromLong(device);
}
#endif

#if HAVE_NCCL
#define COMM_CAPSULE "racedit._C.nccl"

static void comm_free(PyObject *cap) {
    rd_nccl_free(PyCapsule_GetPointer(cap, COMM_CAPSULE));
}

/* nccl_unique_id() -> bytes (rank 0 makes it; MPI broadcasts it). */
static PyObject *py_nccl_unique_id(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    unsigned char id[RD_NCCL_ID_BYTES];
    rd_status s = rd_nccl_unique_id(id);
    return s ? rd_raise(s) : PyBytes_FromStringAndSize((const char *)id, sizeof id);
}

/* nccl_init(unique_id, nranks, rank) -> communicator capsule (collective over the ranks). */
static PyObject *py_nccl_init(PyObject *self, PyObject *args) {
    (void)self;
    const char *id;
    Py_ssize_t len;
    int nranks, rank;
    if (!PyArg_ParseTuple(args, "y#ii:nccl_init", &id, &len, &nranks, &rank)) return NULL;
    if (len != RD_NCCL_ID_BYTES)
        return PyErr_Format(PyExc_ValueError, "unique_id: expected %d bytes, got %zd",
                            RD_NCCL_ID_BYTES, len);
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return PyErr_Format(PyExc_ValueError, "rank: expected 0 <= rank < nranks = %d, got %d",
                            nranks, rank);
    unsigned char uid[RD_NCCL_ID_BYTES];
    memcpy(uid, id, sizeof uid);
    void *comm = NULL;
    rd_status s;
    Py_BEGIN_ALLOW_THREADS s = rd_nccl_init(&comm, uid, nranks, rank);
    Py_END_ALLOW_THREADS
    if (s) return rd_raise(s);
    PyObject *cap = PyCapsule_New(comm, COMM_CAPSULE, comm_free);
    if (!cap) rd_nccl_free(comm);
    return cap;
}

/* nccl_allreduce_grads(comm, model, scale): the model's gradients <- scale * their sum
 * over the ranks, on the device. */
static PyObject *py_nccl_allreduce_grads(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ocomm, *omodel;
    double scale;
    if (!PyArg_ParseTuple(args, "OOd:nccl_allreduce_grads", &ocomm, &omodel, &scale))
        return NULL;
    void *comm = rd_capsule_ptr(ocomm, COMM_CAPSULE, "comm", "a capsule from nccl_init()");
    if (!comm) return NULL;
    rd_busy *busy = NULL;
    rd_model *m = rd_bind_take_model(omodel, &busy);
    if (!m) return NULL;
    PyObject *ret = NULL;
    if (strcmp(rd_model_backend(m)->name, "cuda") != 0) {
        PyErr_Format(PyExc_ValueError, "model: expected a model on device 'cuda', got '%s'",
                     rd_model_backend(m)->name);
        goto done;
    }
    rd_status s;
    Py_BEGIN_ALLOW_THREADS s = rd_nccl_allreduce_scaled(comm, rd_model_buffer(m, RD_BUF_GRADS),
                                                        rd_model_num_params(m), (float)scale);
    Py_END_ALLOW_THREADS
    ret = s ? rd_raise(s) : Py_NewRef(Py_None);
done:
    rd_give(busy);
    return ret;
}
#endif

static PyMethodDef dist_methods[] = {
    {"nccl_built", py_nccl_built, METH_NOARGS, "nccl_built() -> (built with NCCL, version)"},
#ifdef RD_HAVE_CUDA
    {"cuda_select_device", py_cuda_select_device, METH_VARARGS,
     "cuda_select_device(local_rank) -> the device made current (local_rank % count)"},
#else
    {"cuda_select_device", no_nccl, METH_VARARGS, "cuda_select_device: needs CUDA"},
#endif
#if HAVE_NCCL
    {"nccl_unique_id", py_nccl_unique_id, METH_NOARGS, "nccl_unique_id() -> bytes"},
    {"nccl_init", py_nccl_init, METH_VARARGS, "nccl_init(unique_id, nranks, rank) -> comm"},
    {"nccl_allreduce_grads", py_nccl_allreduce_grads, METH_VARARGS,
     "nccl_allreduce_grads(comm, model, scale): gradients <- scale * sum over ranks"},
#else
    {"nccl_unique_id", no_nccl, METH_NOARGS, "nccl_unique_id: needs NCCL"},
    {"nccl_init", no_nccl, METH_VARARGS, "nccl_init: needs NCCL"},
    {"nccl_allreduce_grads", no_nccl, METH_VARARGS, "nccl_allreduce_grads: needs NCCL"},
#endif
    {NULL, NULL, 0, NULL}};

int rd_bind_dist(PyObject *m) { return PyModule_AddFunctions(m, dist_methods); }
