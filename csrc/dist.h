/* dist.h — what data-parallel training (racedit.distributed) needs of the GPU side: the
 * device a rank uses, and NCCL's all-reduce of a model's gradient buffer (cuda/nccl.cu).
 * The communicator is bootstrapped over MPI by the caller: rank 0 makes the unique id,
 * MPI broadcasts it, every rank passes it to rd_nccl_init (llm.c's multi-GPU set-up).
 * Declared in every build; without CUDA, or without NCCL, the binding says so instead of
 * calling them. */
#ifndef RACEDIT_DIST_H
#define RACEDIT_DIST_H

#include "racedit.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RD_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */

/* Make device `local_rank` modulo the device count current for this thread; *device is
 * the device chosen. Call before the rank's first CUDA allocation. */
rd_status rd_cuda_select_device(int local_rank, int *device);

/* 1 when racedit was built with NCCL. */
int rd_nccl_built(void);
/* NCCL's version (e.g. 23007), 0 without NCCL. */
int rd_nccl_version(void);
rd_status rd_nccl_unique_id(unsigned char id[RD_NCCL_ID_BYTES]);
/* A communicator of `nranks` ranks, this one `rank`, on the current device. */
rd_status rd_nccl_init(void **comm, const unsigned char id[RD_NCCL_ID_BYTES], int nranks,
                       int rank);
void rd_nccl_free(void *comm);
/* buf (n floats, device memory) <- scale * (the sum over ranks of buf), in place, on the
 * stream every op runs on (the sum first, then the scale: llm.c's gradient average). */
rd_status rd_nccl_allreduce_scaled(void *comm, float *buf, int64_t n, float scale);

#ifdef __cplusplus
}
#endif
#endif /* RACEDIT_DIST_H */
