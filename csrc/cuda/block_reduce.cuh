// Block-wide reductions shared by the CUDA kernels of every loss family.
#pragma once

#include <cub/block/block_reduce.cuh>

#include "fusedloss/numerics.h"

namespace fusedloss::cuda {

constexpr int kRowBlockThreads = 256;

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct LseMergeOp {
  template <typename acc_t>
  __device__ __forceinline__ LseState<acc_t> operator()(LseState<acc_t> a, LseState<acc_t> b) const {
    return lse_merge(a, b);
  }
};

// Reduce one value per thread of a kRowBlockThreads block and broadcast the
// result to every thread (cub only returns it to thread 0).
template <typename T, typename Op>
__device__ T block_allreduce(T value, Op op) {
  using Reduce = cub::BlockReduce<T, kRowBlockThreads>;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ T result;
  const T reduced = Reduce(storage).Reduce(value, op);
  if (threadIdx.x == 0) result = reduced;
  __syncthreads();
  const T out = result;
  __syncthreads();  // storage and result may be reused by the next call
  return out;
}

}  // namespace fusedloss::cuda
