// benchlib's native helpers around the sparse kernels (built with spmm.cpp by
// benchlib/sparse/build.py): the zero-padded (polyphase, for stride > 1) copy of a conv's
// input that the direct form reads, and max pooling. No exceptions cross the C boundary: the
// Python side validates every argument.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace {

// dst[j] = src[2 * j] for j in [0, n): two vector loads and one shuffle per vector of output.
// Reads stay inside [src, src + 2n - 1), so a row's end is never overrun. The last vector is
// shifted back to end at n (the odd lanes of src[2n - 17 .. 2n - 2]), overlapping the one
// before it with the same values, instead of up to 7 single floats; a row of 5-8 floats takes
// two 4-float halves the same way. Measured on the AVX2 EPYC, ResNet's strided 3x3 inputs
// (in-process A/B, 2 threads): 128 x 56x56 1.15x, 256 x 28x28 1.30x, 512 x 14x14 1.06x faster.
inline void copy_even(float* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  for (; j + 16 < n; j += 16)  // reads src[2j .. 2j + 31]
    _mm512_storeu_ps(dst + j, _mm512_permutex2var_ps(_mm512_loadu_ps(src + 2 * j), even,
                                                     _mm512_loadu_ps(src + 2 * j + 16)));
#endif
#if defined(__AVX2__) && defined(__FMA__)
  for (; j + 8 < n; j += 8) {  // reads src[2j .. 2j + 15]
    const __m256 pairs = _mm256_shuffle_ps(_mm256_loadu_ps(src + 2 * j),
                                           _mm256_loadu_ps(src + 2 * j + 8), 0x88);
    const __m256d ordered = _mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8);
    _mm256_storeu_ps(dst + j, _mm256_castpd_ps(ordered));
  }
  if (j > 0 && j < n) {  // n > 8: the last 8 from src[2n - 17 .. 2n - 2]
    const __m256 pairs = _mm256_shuffle_ps(_mm256_loadu_ps(src + 2 * n - 17),
                                           _mm256_loadu_ps(src + 2 * n - 9), 0xDD);
    const __m256d ordered = _mm256_permute4x64_pd(_mm256_castps_pd(pairs), 0xD8);
    _mm256_storeu_ps(dst + n - 8, _mm256_castpd_ps(ordered));
    return;
  }
  if (j == 0 && n > 4) {  // 5-8: src[0 .. 7] and src[2n - 9 .. 2n - 2]
    _mm_storeu_ps(dst, _mm_shuffle_ps(_mm_loadu_ps(src), _mm_loadu_ps(src + 4), 0x88));
    _mm_storeu_ps(dst + n - 4, _mm_shuffle_ps(_mm_loadu_ps(src + 2 * n - 9),
                                              _mm_loadu_ps(src + 2 * n - 5), 0xDD));
    return;
  }
#endif
  for (; j < n; ++j) dst[j] = src[2 * j];
}

// What one phase image reads: its origin (a, c0) and the rows [i0, i1) and columns [j0, j1)
// that lie inside the input (the rest is padding); the same for every channel.
struct PhaseSpan {
  int64_t a, c0, i0, i1, j0, j1;
};

PhaseSpan phase_span(int64_t a, int64_t c0, int64_t height, int64_t width, int64_t sh,
                     int64_t sw, int64_t top, int64_t left, int64_t phase_h, int64_t phase_w) {
  PhaseSpan s{a, c0, 0, 0, 0, 0};
  // columns j with 0 <= c0 + sw*j - left < width
  s.j0 = std::min<int64_t>(phase_w, std::max<int64_t>(0, (left - c0 + sw - 1) / sw));
  s.j1 = s.j0;
  if (c0 + sw * s.j0 - left < width)
    s.j1 = std::min<int64_t>(phase_w, (width - 1 + left - c0) / sw + 1);
  // rows i with 0 <= a + sh*i - top < height (none when no column is inside)
  s.i0 = std::min<int64_t>(phase_h, std::max<int64_t>(0, (top - a + sh - 1) / sh));
  s.i1 = s.i0;
  if (a + sh * s.i0 - top < height && s.j1 > s.j0)
    s.i1 = std::min<int64_t>(phase_h, (height - 1 + top - a) / sh + 1);
  return s;
}

// The zero-padded phase images of a conv input (see benchlib/sparse/direct.py): for image b,
// phase p = (a, c0) and channel c, out[b][p][c][i][j] = x[b][c][a + sh*i - top][c0 + sw*j - left]
// where that lies inside the input, else 0. x is contiguous NCHW. One task = (image, channel,
// phase), flattened in that order, so one channel's phases follow each other and read its input
// plane while it is in L1 (from L3 or memory once, not once per phase: with the inline moves,
// the strided 3x3 convs' copies took 0.7-0.8x the time); planes `plane` floats apart (>= phase_h *
// phase_w: the rest of a plane is zeroed). A plane is written front to back in runs: the zeros
// before the first input row, then per input row its segment and the zeros up to the next one.
// x may come in bands of `band` rows (benchlib/sparse/bands.py: per band, each channel's rows
// of it in turn, `stride` >= band * width floats apart); band == height with stride == height
// * width is NCHW.
void layout_range(const float* x, int64_t channels, int64_t height, int64_t width, int64_t band,
                  int64_t stride, const PhaseSpan* spans, int64_t phase_count, int64_t sh,
                  int64_t sw, int64_t top, int64_t left, int64_t phase_w, int64_t plane,
                  float* out, int64_t begin, int64_t end) {
  int64_t p = begin % phase_count, c = (begin / phase_count) % channels;
  int64_t b = begin / (channels * phase_count);
  const int64_t band_floats = channels * stride;  // from one band to the next
  const int64_t image_floats = (height / band) * band_floats;
  for (int64_t task = begin; task < end; ++task) {
    const PhaseSpan& s = spans[p];
    const float* image = x + b * image_floats + c * stride;
    float* dst = out + ((b * phase_count + p) * channels + c) * plane;
    const int64_t n = s.j1 - s.j0;
    if (s.i1 == s.i0) {  // the phase reads no input (a tiny input, or a wide padding)
      zero_floats(dst, plane);
    } else {
      zero_floats(dst, s.i0 * phase_w + s.j0);  // the rows above, the first row's left padding
      for (int64_t i = s.i0; i < s.i1; ++i) {
        float* row = dst + i * phase_w + s.j0;
        const int64_t r = s.a + sh * i - top;  // the input row
        const float* in = image + (r / band) * band_floats + (r % band) * width +
                          (s.c0 + sw * s.j0 - left);
        if (sw == 1)
          copy_floats(row, in, n);
        else if (sw == 2)
          copy_even(row, in, n);
        else
          for (int64_t j = 0; j < n; ++j) row[j] = in[j * sw];
        // this row's right padding and, but after the last row, the next row's left padding
        zero_floats(row + n, phase_w - n - (i + 1 < s.i1 ? 0 : s.j0));
      }
      zero_floats(dst + s.i1 * phase_w, plane - s.i1 * phase_w);  // the rows below, the rest
    }
    if (++p == phase_count) {
      p = 0;
      if (++c == channels) {
        c = 0;
        ++b;
      }
    }
  }
}

// Part k of `count` of every (image, phase, channel) plane, stored apart (see
// benchlib_conv_layout's row parts): its `span` phase rows from row k * part_rows, at
// out + (((b * count + k) * phase_count + p) * channels + c) * plane, each row written whole
// (its left padding, its input segment, its right padding; zeros for a row outside the
// input or past phase_h), then zeros to the end of the plane.
void layout_part(const float* x, int64_t images, int64_t channels, int64_t height,
                 int64_t width, int64_t band, int64_t stride, const PhaseSpan* spans,
                 int64_t phase_count, int64_t sh, int64_t sw, int64_t top, int64_t left,
                 int64_t phase_h, int64_t phase_w, int64_t plane, float* out, int64_t k,
                 int64_t count, int64_t part_rows, int64_t span) {
  const int64_t band_floats = channels * stride;
  const int64_t image_floats = (height / band) * band_floats;
  const int64_t row0 = k * part_rows;
  for (int64_t b = 0; b < images; ++b) {
    for (int64_t c = 0; c < channels; ++c) {
      const float* image = x + b * image_floats + c * stride;
      for (int64_t p = 0; p < phase_count; ++p) {
        const PhaseSpan& s = spans[p];
        float* dst = out + (((b * count + k) * phase_count + p) * channels + c) * plane;
        const int64_t n = s.j1 - s.j0;
        // local rows [first, last) read the input; the rest are zeros
        const int64_t first = std::min(span, std::max<int64_t>(0, s.i0 - row0));
        const int64_t last = std::max(first, std::min(span, std::min(s.i1, phase_h) - row0));
        zero_floats(dst, first * phase_w);
        for (int64_t i = first; i < last; ++i) {
          float* row = dst + i * phase_w;
          const int64_t r = s.a + sh * (row0 + i) - top;  // the input row
          const float* in = image + (r / band) * band_floats + (r % band) * width +
                            (s.c0 + sw * s.j0 - left);
          zero_floats(row, s.j0);
          if (sw == 1)
            copy_floats(row + s.j0, in, n);
          else if (sw == 2)
            copy_even(row + s.j0, in, n);
          else
            for (int64_t j = 0; j < n; ++j) row[s.j0 + j] = in[j * sw];
          zero_floats(row + s.j0 + n, phase_w - s.j0 - n);
        }
        zero_floats(dst + last * phase_w, plane - last * phase_w);
      }
    }
  }
}

// Max pooling of one (image, channel) plane, separably: the vertical max of each output row's
// window rows (contiguous, vectorized) into `band`, then the horizontal max over `band`.
// Out-of-image positions are skipped (padding never wins); a NaN wins, as in torch. With
// `relu` the outputs are ReLU'd: relu(max(window)) == max(relu(window)), NaN included, so a
// ReLU before the pool moves after it and costs a compare per output instead of a pass over
// the pool's input (four times its output for a 3x3/2 pool).
inline float max_nan(float a, float b) { return ((b > a) | (b != b)) ? b : a; }
inline float relu_nan(float a) { return a < 0.0f ? 0.0f : a; }  // NaN stays NaN

#if defined(__AVX512F__)
// max_nan of each lane: b where b > a or b is NaN, else a (the scalar's choice, signed zeros
// and NaNs included). With it the rows' vertical max and the 3-wide, stride-2 windows run 16
// lanes at a time: ResNet-50's pool (64 x 112x112, ReLU fused, 2 threads, input in cache) took
// 120 us against 150-152 with the compiler's code (AVX-512 Xeon, three runs each).
inline __m512 max_nan16(__m512 a, __m512 b) {
  const __mmask16 take =
      _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
  return _mm512_mask_blend_ps(take, a, b);
}

// The 3-wide, stride-2 windows of a band row, 16 outputs at a time: out[j] = max_nan(max_nan(
// band[2j], band[2j + 1]), band[2j + 2]) as the scalar loop; the even and odd floats of 32
// (and of the 32 from 2 on) by one two-source permute each. Reads band[0 .. 2 * done + 1],
// where done (returned: the outputs written) is out_w rounded down to 16; the band holds 32
// floats more than its windows reach.
inline int64_t pool_row_3s2(const float* band, float* out, int64_t out_w) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t j = 0;
  for (; j + 16 <= out_w; j += 16) {
    const float* b = band + 2 * j;
    const __m512 lo = _mm512_loadu_ps(b), hi = _mm512_loadu_ps(b + 16);
    const __m512 lo2 = _mm512_loadu_ps(b + 2), hi2 = _mm512_loadu_ps(b + 18);
    const __m512 first = _mm512_permutex2var_ps(lo, even, hi);
    const __m512 second = _mm512_permutex2var_ps(lo, odd, hi);
    const __m512 third = _mm512_permutex2var_ps(lo2, even, hi2);
    _mm512_storeu_ps(out + j, max_nan16(max_nan16(first, second), third));
  }
  return j;
}
#endif

// band holds pw -inf floats, the row's width floats, then enough -inf for the last window
// (and 32 more: pool_row_3s2's loads).
void pool_plane(const float* in, int64_t height, int64_t width, float* out, int64_t out_h,
                int64_t out_w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                int64_t pw, int64_t dh, int64_t dw, bool relu, float* band) {
  const float lowest = -std::numeric_limits<float>::infinity();
  float* row_max = band + pw;
  for (int64_t oh = 0; oh < out_h; ++oh) {
    for (int64_t j = 0; j < width; ++j) row_max[j] = lowest;
    for (int64_t r = 0; r < kh; ++r) {
      const int64_t row = oh * sh - ph + r * dh;
      if (row < 0 || row >= height) continue;
      const float* src = in + row * width;
      int64_t j = 0;
#if defined(__AVX512F__)
      for (; j + 16 <= width; j += 16)
        _mm512_storeu_ps(row_max + j, max_nan16(_mm512_loadu_ps(row_max + j),
                                                _mm512_loadu_ps(src + j)));
#endif
      for (; j < width; ++j) row_max[j] = max_nan(row_max[j], src[j]);
    }
    float* dst = out + oh * out_w;
    if (kw == 3 && dw == 1) {
      int64_t ow = 0;
#if defined(__AVX512F__)
      if (sw == 2) ow = pool_row_3s2(band, dst, out_w);
#endif
      for (; ow < out_w; ++ow) {
        const float* w = band + ow * sw;
        dst[ow] = max_nan(max_nan(w[0], w[1]), w[2]);
      }
    } else {
      for (int64_t ow = 0; ow < out_w; ++ow) {
        const float* w = band + ow * sw;
        float m = w[0];
        for (int64_t s = 1; s < kw; ++s) m = max_nan(m, w[s * dw]);
        dst[ow] = m;
      }
    }
    if (relu)
      for (int64_t ow = 0; ow < out_w; ++ow) dst[ow] = relu_nan(dst[ow]);
  }
}

}  // namespace

extern "C" {

// torch's max_pool2d (no ceil_mode, no indices) of the contiguous NCHW fp32 x into the
// contiguous (planes, out_h, out_w) out; planes = images * channels; relu != 0: then ReLU'd
// (the same values as the pool of relu(x)).
int benchlib_max_pool2d(const float* x, int64_t planes, int64_t height, int64_t width,
                        float* out, int64_t out_h, int64_t out_w, int64_t kh, int64_t kw,
                        int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                        int relu, int threads) {
  const int64_t work = planes * out_h * width * kh;
  parallel_rows(planes, work < 32768 ? 1 : threads, [&](int64_t t, int64_t parts) {
    // -inf around the row: pw before, and after it up to the last window's end
    const int64_t span =
        std::max<int64_t>(pw + width, (out_w - 1) * sw + (kw - 1) * dw + 1) + 32;
    std::vector<float> band(static_cast<size_t>(span), -std::numeric_limits<float>::infinity());
    for (int64_t p = planes * t / parts; p < planes * (t + 1) / parts; ++p)
      pool_plane(x + p * height * width, height, width, out + p * out_h * out_w, out_h, out_w,
                 kh, kw, sh, sw, ph, pw, dh, dw, relu != 0, band.data());
  });
  return 0;
}

// Writes the (images, phase_count, channels, plane) phase images (phase_h x phase_w each, at
// the start of its plane) of the contiguous input x (see layout_range): NCHW, or in bands of
// `band` rows where 0 < band <= height (band must divide height), each channel's rows of a
// band `stride` floats apart (0: band * width; else at least that); phases holds phase_count
// (row, col) origins. The threads split the planes.
//
// Row parts (part_rows >= 0, row_parts > 0, 0 < part_span, part_span * phase_w <= plane): the
// source of a product run in order over row_parts parts, part_rows output rows apart (two
// parts of an odd number of rows overlap by one: their span counts one row more; part_rows
// 0 makes every part a whole copy, one a thread: spmm.cpp's copy_of)
// (spmm.cpp's in_order, parts part_floats = phase_count * channels * plane apart, per image
// row_parts of them): part k holds the part_span phase rows from k * part_rows of every plane
// (its rows and the halo the kernel reads below them, copied into both parts), as
// (images, row_parts, phase_count, channels, plane), and thread t of `parts` writes parts
// [row_parts * t / parts, row_parts * (t + 1) / parts). Each thread then reads back only what
// it wrote, from one contiguous run: handed over by planes, half of the copy moves to the
// other core. Measured on the Zen 4 EPYC VM, 2 threads, 3x3/2 256 -> 256 @28 at 90%, the copy
// then the product: handed over by planes 409 us where the two vCPUs exchange a cache line in
// 50-120 ns and 1277 us where they take 350-400 ns (on different CCDs), against 48 + 234 us
// run apart; in row parts 348 and 433 us. Split by rows within the planes instead, the copy
// alone took 157 / 706 us against 48 / 84 (the threads' rows interleave a few lines apart).
int benchlib_conv_layout(const float* x, int64_t images, int64_t channels, int64_t height,
                         int64_t width, const int32_t* phases, int64_t phase_count, int64_t sh,
                         int64_t sw, int64_t top, int64_t left, int64_t phase_h, int64_t phase_w,
                         int64_t plane, float* out, int threads, int64_t band, int64_t stride,
                         int64_t part_rows, int64_t row_parts, int64_t part_span) {
  if (band <= 0 || band > height) band = height;
  if (stride < band * width) stride = band * width;
  const int64_t tasks = images * phase_count * channels;
  const int64_t work = tasks * plane;
  std::vector<PhaseSpan> spans;
  for (int64_t p = 0; p < phase_count; ++p)
    spans.push_back(phase_span(phases[2 * p], phases[2 * p + 1], height, width, sh, sw, top,
                               left, phase_h, phase_w));
  if (part_rows >= 0 && row_parts > 0 && part_span > 0 && part_span * phase_w <= plane) {
    parallel_rows(row_parts, work * row_parts < 32768 ? 1 : threads,
                  [&](int64_t t, int64_t parts) {
      for (int64_t k = row_parts * t / parts; k < row_parts * (t + 1) / parts; ++k)
        layout_part(x, images, channels, height, width, band, stride, spans.data(),
                    phase_count, sh, sw, top, left, phase_h, phase_w, plane, out, k, row_parts,
                    part_rows, part_span);
    });
    return 0;
  }
  parallel_rows(tasks, work < 32768 ? 1 : threads, [&](int64_t t, int64_t parts) {
    layout_range(x, channels, height, width, band, stride, spans.data(), phase_count, sh, sw,
                 top, left, phase_w, plane, out, tasks * t / parts, tasks * (t + 1) / parts);
  });
  return 0;
}

// benchlib_conv_layout with its arguments packed in one array, in the same order (see
// packed_ptr and spmm.cpp's packed entry points).
int benchlib_conv_layout_packed(const int64_t* a) {
  return benchlib_conv_layout(packed_ptr<const float>(a, 0), a[1], a[2], a[3], a[4],
                              packed_ptr<const int32_t>(a, 5), a[6], a[7], a[8], a[9], a[10],
                              a[11], a[12], a[13], packed_ptr<float>(a, 14),
                              static_cast<int>(a[15]), a[16], a[17], a[18], a[19], a[20]);
}

}  // extern "C"
