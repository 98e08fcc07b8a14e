/* probe.cu — the CUDA side's smallest piece: a device count and a self-test kernel,
 * compiled whenever nvcc is found so that CI proves the CUDA toolchain path builds. */
#include <cuda_runtime.h>
#include <stdio.h>

__global__ void rd_probe_axpy(float *y, const float *x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}

extern "C" int rd_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear: no driver / no device is not an error here */
        return 0;
    }
    return n;
}

extern "C" const char *rd_cuda_runtime_version(void) {
    static char buf[32];
    int v = 0;
    cudaRuntimeGetVersion(&v);
    snprintf(buf, sizeof buf, "%d.%d", v / 1000, (v % 1000) / 10);
    return buf;
}
