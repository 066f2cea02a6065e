// Every CUDA and cuBLAS call goes through these: a failure throws lmd::Error naming the call.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "lmd/core/error.h"

#define LMD_CUDA_CHECK(call)                                                       \
  do {                                                                             \
    const cudaError_t lmd_err_ = (call);                                           \
    if (lmd_err_ != cudaSuccess)                                                   \
      ::lmd::fail("CUDA error in ", #call, ": ", cudaGetErrorName(lmd_err_), " (", \
                  cudaGetErrorString(lmd_err_), ") at ", __FILE__, ":", __LINE__); \
  } while (0)

#define LMD_CUBLAS_CHECK(call)                                                                            \
  do {                                                                                                    \
    const cublasStatus_t lmd_st_ = (call);                                                                \
    if (lmd_st_ != CUBLAS_STATUS_SUCCESS)                                                                 \
      ::lmd::fail("cuBLAS error in ", #call, ": ", cublasGetStatusString(lmd_st_), " at ", __FILE__, ":", \
                  __LINE__);                                                                              \
  } while (0)

// After a kernel launch: catches bad launch configurations at once (execution errors surface at the
// next synchronising call).
#define LMD_CUDA_LAUNCHED() LMD_CUDA_CHECK(cudaGetLastError())
