/* backends.c — the backends by name: the one place that knows which were built. */
#include "../backend.h"

#include <string.h>

rd_status rd_backend_get(const char *name, const rd_backend **out) {
    *out = NULL;
    if (!strcmp(name, "cpu")) *out = &rd_backend_cpu;
    else if (!strcmp(name, "check")) *out = &rd_backend_check;
#ifdef RD_HAVE_CUDA
    else if (!strcmp(name, "cuda")) *out = &rd_backend_cuda; /* a device: the caller asks */
#else
    else if (!strcmp(name, "cuda"))
        return rd_fail(RD_ECUDA, "CUDA not available: racedit was built without CUDA");
#endif
    return *out ? RD_OK : rd_fail(RD_EINVAL, "device: expected 'cpu' or 'cuda', got '%s'", name);
}
