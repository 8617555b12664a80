// The classifier head a chain of sparse convs can end with (benchlib/sparse/chain.py): the
// global average pool and a dense linear layer (built with spmm.cpp by build.py).
// Run inside the chain's native call, not from Python after it: the first torch call after the
// chain found the interpreter's and the dispatcher's code and data evicted by the chain's
// weights (ResNet-50's average pool took 140-320 us there against about 30 us warm). No
// exceptions cross the C boundary: the Python side validates every argument.

#include <cstdint>

#include "common.h"

namespace {

// The sum of a vector's lanes, in lane order.
inline float lane_sum(V::T lanes) {
  alignas(64) float partial[V::W];
  V::store(partial, lanes);
  float sum = 0.0f;
  for (int i = 0; i < V::W; ++i) sum += partial[i];
  return sum;
}

}  // namespace

extern "C" {

// out[p] = the mean of the `plane` contiguous floats of plane p of x, for p in [0, planes),
// planes `stride` floats apart (0: plane; else at least plane): the global average pool of an
// NCHW x (planes = images * channels), its planes padded or not. Summed in V::W lanes, then
// the lanes and the tail in order, in fp32 as torch's adaptive_avg_pool2d (only the order of
// the sums differs).
int benchlib_mean_planes(const float* x, int64_t planes, int64_t plane, float* out,
                         int threads, int64_t stride) {
  if (stride < plane) stride = plane;
  parallel_rows(planes, planes * plane < 32768 ? 1 : threads, [&](int64_t t, int64_t parts) {
    for (int64_t p = planes * t / parts; p < planes * (t + 1) / parts; ++p) {
      const float* src = x + p * stride;
      V::T lanes = V::zero();
      int64_t k = 0;
      for (; k + V::W <= plane; k += V::W) lanes = V::add(lanes, V::load(src + k));
      float sum = lane_sum(lanes);
      for (; k < plane; ++k) sum += src[k];
      out[p] = plane > 0 ? sum / static_cast<float>(plane) : 0.0f;
    }
  });
  return 0;
}

// benchlib_mean_planes with its arguments packed in one array, in the same order.
int benchlib_mean_planes_packed(const int64_t* a) {
  return benchlib_mean_planes(packed_ptr<const float>(a, 0), a[1], a[2], packed_ptr<float>(a, 3),
                              static_cast<int>(a[4]), a[5]);
}

// y[b][m] = bias[m] + sum_k w[m][k] * x[b][k] for b in [0, images), m in [0, M): a dense
// linear layer, w row-major (M, K), x (images, K), y (images, M), bias null or M floats. Each
// row's dot product in four vector accumulators, then their lanes and the tail in order, in
// fp32 (only the order of the sums differs from torch's). The rows are split between the
// threads: at batch 1 the layer streams its weights once (ResNet-50's 2048 -> 1000: 8 MB).
int benchlib_dense_linear(const float* x, int64_t images, int64_t K, const float* w,
                          const float* bias, int64_t M, float* y, int threads) {
  const int64_t work = images * K * M;
  parallel_rows(M, work < 32768 ? 1 : threads, [&](int64_t t, int64_t parts) {
    for (int64_t m = M * t / parts; m < M * (t + 1) / parts; ++m) {
      const float* row = w + m * K;
      for (int64_t b = 0; b < images; ++b) {
        const float* in = x + b * K;
        V::T acc[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
        int64_t k = 0;
        for (; k + 4 * V::W <= K; k += 4 * V::W)
          for (int u = 0; u < 4; ++u)
            acc[u] = V::fma(V::load(row + k + u * V::W), V::load(in + k + u * V::W), acc[u]);
        for (; k + V::W <= K; k += V::W)
          acc[0] = V::fma(V::load(row + k), V::load(in + k), acc[0]);
        float sum = lane_sum(V::add(V::add(acc[0], acc[1]), V::add(acc[2], acc[3])));
        for (; k < K; ++k) sum += row[k] * in[k];
        y[b * M + m] = (bias ? bias[m] : 0.0f) + sum;
      }
    }
  });
  return 0;
}

// benchlib_dense_linear with its arguments packed in one array, in the same order.
int benchlib_dense_linear_packed(const int64_t* a) {
  return benchlib_dense_linear(packed_ptr<const float>(a, 0), a[1], a[2],
                               packed_ptr<const float>(a, 3), packed_ptr<const float>(a, 4), a[5],
                               packed_ptr<float>(a, 6), static_cast<int>(a[7]));
}

}  // extern "C"
