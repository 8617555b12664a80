// benchlib's native helpers around the sparse kernels (built with spmm.cpp by
// benchlib/sparse/build.py): the zero-padded (polyphase, for stride > 1) copy of a conv's
// input that the direct form reads, and max pooling. No exceptions cross the C boundary: the
// Python side validates every argument.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace {

// The zero-padded phase images of a conv input (see benchlib/sparse/direct.py): for image b,
// phase p = (a, c0) and channel c, out[b][p][c][i][j] = x[b][c][a + sh*i - top][c0 + sw*j - left]
// where that lies inside the input, else 0. x is contiguous NCHW.
void layout_range(const float* x, int64_t channels, int64_t height, int64_t width,
                  const int32_t* phases, int64_t phase_count, int64_t sh, int64_t sw, int64_t top,
                  int64_t left, int64_t phase_h, int64_t phase_w, int64_t plane, float* out,
                  int64_t begin, int64_t end) {
  // one task = (image, phase, channel), flattened in that order; planes `plane` floats apart
  // (>= phase_h * phase_w: the rest of a plane is zeroed)
  const int64_t used = phase_h * phase_w;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t c = task % channels;
    const int64_t p = (task / channels) % phase_count;
    const int64_t b = task / (channels * phase_count);
    const float* src = x + (b * channels + c) * height * width;
    float* dst = out + task * plane;
    if (plane > used) std::memset(dst + used, 0, (plane - used) * sizeof(float));
    const int64_t a = phases[2 * p], c0 = phases[2 * p + 1];
    // columns j with 0 <= c0 + sw*j - left < width
    const int64_t j0 = std::min<int64_t>(phase_w, std::max<int64_t>(0, (left - c0 + sw - 1) / sw));
    int64_t j1 = j0;  // one past the last such j
    if (c0 + sw * j0 - left < width)
      j1 = std::min<int64_t>(phase_w, (width - 1 + left - c0) / sw + 1);
    for (int64_t i = 0; i < phase_h; ++i) {
      float* row = dst + i * phase_w;
      const int64_t r = a + sh * i - top;
      if (r < 0 || r >= height || j1 <= j0) {
        std::memset(row, 0, phase_w * sizeof(float));
        continue;
      }
      if (j0 > 0) std::memset(row, 0, j0 * sizeof(float));
      const float* in = src + r * width + (c0 + sw * j0 - left);
      if (sw == 1) {
        std::memcpy(row + j0, in, (j1 - j0) * sizeof(float));
      } else if (sw == 2) {  // a constant stride the compiler vectorizes
        float* __restrict out_row = row + j0;
        const float* __restrict in_row = in;
        const int count = static_cast<int>(j1 - j0);
        for (int j = 0; j < count; ++j) out_row[j] = in_row[2 * j];
      } else {
        for (int64_t j = j0; j < j1; ++j) row[j] = in[(j - j0) * sw];
      }
      if (j1 < phase_w) std::memset(row + j1, 0, (phase_w - j1) * sizeof(float));
    }
  }
}

// Max pooling of one (image, channel) plane, separably: the vertical max of each output row's
// window rows (contiguous, vectorized) into `band`, then the horizontal max over `band`.
// Out-of-image positions are skipped (padding never wins); a NaN wins, as in torch.
inline float max_nan(float a, float b) { return ((b > a) | (b != b)) ? b : a; }

// band holds pw -inf floats, the row's width floats, then enough -inf for the last window.
void pool_plane(const float* in, int64_t height, int64_t width, float* out, int64_t out_h,
                int64_t out_w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                int64_t pw, int64_t dh, int64_t dw, float* band) {
  const float lowest = -std::numeric_limits<float>::infinity();
  float* row_max = band + pw;
  for (int64_t oh = 0; oh < out_h; ++oh) {
    for (int64_t j = 0; j < width; ++j) row_max[j] = lowest;
    for (int64_t r = 0; r < kh; ++r) {
      const int64_t row = oh * sh - ph + r * dh;
      if (row < 0 || row >= height) continue;
      const float* src = in + row * width;
      for (int64_t j = 0; j < width; ++j) row_max[j] = max_nan(row_max[j], src[j]);
    }
    float* dst = out + oh * out_w;
    if (kw == 3 && dw == 1) {
      for (int64_t ow = 0; ow < out_w; ++ow) {
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
  }
}

}  // namespace

extern "C" {

// torch's max_pool2d (no ceil_mode, no indices) of the contiguous NCHW fp32 x into the
// contiguous (planes, out_h, out_w) out; planes = images * channels.
int benchlib_max_pool2d(const float* x, int64_t planes, int64_t height, int64_t width,
                        float* out, int64_t out_h, int64_t out_w, int64_t kh, int64_t kw,
                        int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                        int threads) {
  const int64_t work = planes * out_h * width * kh;
  parallel_rows(planes, work < 32768 ? 1 : threads, [&](int64_t t, int64_t parts) {
    // -inf around the row: pw before, and after it up to the last window's end
    const int64_t span = std::max<int64_t>(pw + width, (out_w - 1) * sw + (kw - 1) * dw + 1);
    std::vector<float> band(static_cast<size_t>(span), -std::numeric_limits<float>::infinity());
    for (int64_t p = planes * t / parts; p < planes * (t + 1) / parts; ++p)
      pool_plane(x + p * height * width, height, width, out + p * out_h * out_w, out_h, out_w,
                 kh, kw, sh, sw, ph, pw, dh, dw, band.data());
  });
  return 0;
}

// Writes the (images, phase_count, channels, plane) phase images (phase_h x phase_w each, at
// the start of its plane) of the contiguous NCHW input x (see layout_range); phases holds
// phase_count (row, col) origins.
int benchlib_conv_layout(const float* x, int64_t images, int64_t channels, int64_t height,
                         int64_t width, const int32_t* phases, int64_t phase_count, int64_t sh,
                         int64_t sw, int64_t top, int64_t left, int64_t phase_h, int64_t phase_w,
                         int64_t plane, float* out, int threads) {
  const int64_t tasks = images * phase_count * channels;
  const int64_t work = tasks * plane;
  parallel_rows(tasks, work < 32768 ? 1 : threads, [&](int64_t t, int64_t parts) {
    const int64_t begin = tasks * t / parts, end = tasks * (t + 1) / parts;
    layout_range(x, channels, height, width, phases, phase_count, sh, sw, top, left, phase_h,
                 phase_w, plane, out, begin, end);
  });
  return 0;
}

}  // extern "C"
