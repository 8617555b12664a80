// Shared by benchlib's native kernels (spmm.cpp, layout.cpp, head.cpp): the vector type of the
// instruction set they are compiled for (AVX-512, AVX2 + FMA, or portable C++), the inline
// moves of short runs of floats, and the OpenMP loop that runs a body on torch's threads.

#pragma once

#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
namespace {
constexpr const char* kIsa = "avx512";
struct V {
  static constexpr int W = 16;
  using T = __m512;
  using M = __mmask16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T loadm(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static void storem(float* p, T v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T relu(T a) { return _mm512_max_ps(zero(), a); }  // NaN stays NaN
  static M mask(int n) { return static_cast<M>((1u << n) - 1u); }
};
}  // namespace
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
namespace {
constexpr const char* kIsa = "avx2";
struct V {
  static constexpr int W = 8;
  using T = __m256;
  using M = __m256i;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T loadm(const float* p, M m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static void storem(float* p, T v, M m) { _mm256_maskstore_ps(p, m, v); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T relu(T a) { return _mm256_max_ps(zero(), a); }
  static M mask(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
};
}  // namespace
#else
namespace {
constexpr const char* kIsa = "generic";
struct V {  // portable C++: the compiler vectorizes what it can
  static constexpr int W = 8;
  struct T {
    float v[W];
  };
  using M = int;
  static T zero() { return set1(0.0f); }
  static T set1(float a) {
    T t;
    for (int i = 0; i < W; ++i) t.v[i] = a;
    return t;
  }
  static T load(const float* p) {
    T t;
    std::memcpy(t.v, p, sizeof t.v);
    return t;
  }
  static T loadm(const float* p, M m) {
    T t = zero();
    for (int i = 0; i < m && i < W; ++i) t.v[i] = p[i];
    return t;
  }
  static void store(float* p, T v) { std::memcpy(p, v.v, sizeof v.v); }
  static void storem(float* p, T v, M m) {
    for (int i = 0; i < m && i < W; ++i) p[i] = v.v[i];
  }
  static T fma(T a, T b, T c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static T add(T a, T b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static T relu(T a) {
    for (int i = 0; i < W; ++i) a.v[i] = a.v[i] < 0.0f ? 0.0f : a.v[i];
    return a;
  }
  static M mask(int n) { return n; }
};
}  // namespace
#endif

namespace {

// Short runs of floats (a row's padding or segment: 7-58 floats in ResNet-50) written inline:
// full vectors, then the tail of n % W floats. AVX-512 stores its tail masked. On AVX2 a run
// of at least 8 ends with one more full vector that overlaps the previous one, and a shorter
// run goes by 4-, 2- and 1-float moves: AVX2's masked moves are microcoded on AMD's cores (a
// 7-float copy by a masked load and store measured 3.1x one by 4-, 2- and 1-float moves on
// the Zen 3 EPYC), and a plain tail loop is turned into a memset / memcpy call by the
// compiler. A run of n <= 0 floats writes nothing.
#if defined(__AVX512F__)
inline void zero_floats(float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, _mm512_setzero_ps());
  if (k < n)
    _mm512_mask_storeu_ps(dst + k, static_cast<__mmask16>((1u << (n - k)) - 1u),
                          _mm512_setzero_ps());
}

inline void copy_floats(float* dst, const float* src, int64_t n) {
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(dst + k, _mm512_loadu_ps(src + k));
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1u);
    _mm512_mask_storeu_ps(dst + k, m, _mm512_maskz_loadu_ps(m, src + k));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
inline void zero_floats(float* dst, int64_t n) {
  const __m256 z = _mm256_setzero_ps();
  if (n <= 0) return;
  if (n >= 8) {
    for (int64_t k = 0; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, z);
    if (n % 8) _mm256_storeu_ps(dst + n - 8, z);
    return;
  }
  if (n & 4) _mm_storeu_ps(dst, _mm_setzero_ps());
  if (n & 2) _mm_storel_pi(reinterpret_cast<__m64*>(dst + (n & 4)), _mm_setzero_ps());
  if (n & 1) dst[n - 1] = 0.0f;
}

inline void copy_floats(float* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  if (n >= 8) {
    for (int64_t k = 0; k + 8 <= n; k += 8) _mm256_storeu_ps(dst + k, _mm256_loadu_ps(src + k));
    if (n % 8) _mm256_storeu_ps(dst + n - 8, _mm256_loadu_ps(src + n - 8));
    return;
  }
  if (n & 4) _mm_storeu_ps(dst, _mm_loadu_ps(src));
  if (n & 2) {
    const int64_t k = n & 4;
    _mm_storel_pi(reinterpret_cast<__m64*>(dst + k),
                  _mm_loadl_pi(_mm_setzero_ps(), reinterpret_cast<const __m64*>(src + k)));
  }
  if (n & 1) dst[n - 1] = src[n - 1];
}
#else
inline void zero_floats(float* dst, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = 0.0f;
}

inline void copy_floats(float* dst, const float* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k];
}
#endif

// Runs body(t, parts) on each of `threads` OpenMP threads (t in [0, parts)), or body(0, 1)
// on this one when there is one thread or one row of work.
template <typename Body>
void parallel_rows(int64_t rows, int threads, const Body& body) {
#ifdef _OPENMP
  if (threads > 1 && rows > 1) {
    if (omp_get_max_threads() != threads) omp_set_num_threads(threads);  // as torch does
#pragma omp parallel
    {
      const int64_t t = omp_get_thread_num(), parts = omp_get_num_threads();
      body(t, parts);
    }
    return;
  }
#else
  (void)threads;
#endif
  body(0, 1);
}

// Argument k of a packed call (a *_packed entry point: every argument of the plain one, in
// its order, as one int64 each; pointers as their address, null as 0).
template <typename T>
inline T* packed_ptr(const int64_t* args, int k) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(args[k]));
}

}  // namespace
