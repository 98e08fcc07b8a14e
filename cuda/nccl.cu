/* nccl.cu — the GPU side of data-parallel training (csrc/dist.h): the rank's device and
 * NCCL's in-place all-reduce of the gradient buffer on the stream the ops run on, then
 * the 1/J scale. NCCL comes from the toolkit, the system or the nvidia-nccl wheel
 * (setup.py, like cuBLAS); without it only the device choice is compiled. */
#include <string.h>

#include "common.cuh"
#include "dist.h"

#ifdef RD_HAVE_NCCL
#include <nccl.h>
#endif

extern "C" rd_status rd_cuda_select_device(int local_rank, int *device) {
    int n = 0;
    CU_TRY(cudaGetDeviceCount(&n));
    if (n < 1) return rd_fail(RD_ECUDA, "select_device: no CUDA device");
    *device = local_rank % n;
    CU_TRY(cudaSetDevice(*device));
    return RD_OK;
}

#ifdef RD_HAVE_NCCL

#define NC_TRY(call)                                                                     \
    do {                                                                                 \
        ncclResult_t r_ = (call);                                                        \
        if (r_ != ncclSuccess)                                                           \
            return rd_fail(RD_ECUDA, "NCCL error in %s (%s:%d): %s", #call, __FILE__,    \
                           __LINE__, ncclGetErrorString(r_));                            \
    } while (0)

static_assert(sizeof(ncclUniqueId) == RD_NCCL_ID_BYTES, "ncclUniqueId size");

extern "C" int rd_nccl_built(void) { return 1; }

extern "C" int rd_nccl_version(void) {
    int v = 0;
    return ncclGetVersion(&v) == ncclSuccess ? v : 0;
}

extern "C" rd_status rd_nccl_unique_id(unsigned char id[RD_NCCL_ID_BYTES]) {
    ncclUniqueId u;
    NC_TRY(ncclGetUniqueId(&u));
    memcpy(id, &u, sizeof u);
    return RD_OK;
}

extern "C" rd_status rd_nccl_init(void **comm, const unsigned char id[RD_NCCL_ID_BYTES],
                                  int nranks, int rank) {
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclComm_t c = NULL;
    NC_TRY(ncclCommInitRank(&c, nranks, u, rank));
    *comm = c;
    return RD_OK;
}

extern "C" void rd_nccl_free(void *comm) {
    if (comm) ncclCommDestroy((ncclComm_t)comm);
}

__global__ static void scale_kernel(float *x, int64_t n, float s) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] *= s;
}

extern "C" rd_status rd_nccl_allreduce_scaled(void *comm, float *buf, int64_t n, float scale) {
    if (n <= 0) return RD_OK;
    NC_TRY(ncclAllReduce(buf, buf, (size_t)n, ncclFloat, ncclSum, (ncclComm_t)comm, RD_STREAM));
    if (scale != 1.0f) {
        const int64_t blocks = (n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096;
        scale_kernel<<<(unsigned)blocks, 256, 0, RD_STREAM>>>(buf, n, scale);
        CU_LAUNCHED("scale_kernel");
    }
    return RD_OK;
}

#else

extern "C" int rd_nccl_built(void) { return 0; }
extern "C" int rd_nccl_version(void) { return 0; }

#endif /* RD_HAVE_NCCL */
