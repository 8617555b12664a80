// benchlib's sparse x dense kernels for the CPU (built just in time by benchlib/sparse/build.py).
//
// One weight matrix W (M rows, compressed by rows in blocks of R consecutive rows sharing a
// column: R = 1 is CSR, R = 4 / 8 the 4x1 / 8x1 block formats) multiplies a dense operand that
// is read through per-entry offsets ("gather form"):
//
//   Y[b][m][place(q)] = act(bias[m] + sum_j val[j*R + r] * X[b*x_image + off[j] + q])
//
// for every image b, block row i (rows m = i*R + r), entry j of block row i and column q in
// [0, n). A 1x1 conv has off = k * H*W; a k x k conv reads a zero-padded (polyphase for stride
// > 1) copy of its input, so the same loop computes it without im2col; place(q) drops the
// columns of the padded rows that are no output (q % pitch >= row_len).
//
// Parts: each image's columns may come as `parts` parts of n columns, part t of image b read
// at X + b*x_image + t*x_part and written at Y + b*y_image + t*y_part (the residual as Y).
// That lets a conv read and write its activations in bands of whole rows (benchlib/sparse/
// bands.py: per band, every channel's rows of the band, one after another), where one column
// tile's strip of X is contiguous instead of one short run per channel plane.
// Output rows: the row_len columns kept of each computed row are written out_pitch floats
// after the last row's (out_pitch >= row_len; row_len: packed rows), so that a conv can write
// into the zero-padded layout the next conv reads (benchlib/sparse/chain.py).
//
// Register tiling over q as in XNNPACK's spmm: a tile of NV vectors of columns stays in
// registers while the entries of one block row stream past (one broadcast of the weight, NV
// loads, NV * R FMAs per entry), tiles outer and rows inner so the tile's strip of X stays in
// cache for all the rows. Threads claim the column tiles (guided, see run_gather) or split
// the block rows into ranges of work (entries plus a per-row cost) in proportion to their
// learned speeds, on the OpenMP runtime torch itself uses. Plain IEEE arithmetic, no
// fast-math: only the order of the sums differs from a dense product.
//
// Column blocks (ksplit, optional): W's columns (its input channels) in blocks, outer over a
// tile, so that the strip of X one block reads stays in L1 for all the rows; the partial sums
// wait in Y (or in a per-thread buffer of all the rows' tiles, scattered at the end). The
// entries are then stored block-major (by column block, then row, as the loops read them), so
// that the weights stream in order: read row-major, each row's range in a block is a short
// jump from the last (ResNet-50 magnitude:0.9 end to end ran 0.92x the time block-major).
//
// The "rows" kernel is the small-batch linear layer: X row-major (batch, K), Y (batch, M).
//
// No exceptions cross the C boundary: the Python side validates every argument; the functions
// return 0, or 1 for an unsupported block height.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using VT = V::T;
using VM = V::M;

// Column tile widths, in vectors, per block height: as wide as the registers allow (each
// entry then costs one broadcast per row and one load per vector), and at least 4
// accumulators in flight per row for R = 1 (more come from splitting the entries, below).
#ifndef BENCHLIB_NV1
#if defined(__AVX512F__)
#define BENCHLIB_NV1 8
#define BENCHLIB_NV2 6
#define BENCHLIB_NV4 4
#define BENCHLIB_NV8 2
#else
#define BENCHLIB_NV1 8
#define BENCHLIB_NV2 4
#define BENCHLIB_NV4 2
#define BENCHLIB_NV8 1
#endif
#endif
constexpr int kMaxNV1 = BENCHLIB_NV1, kMaxNV2 = BENCHLIB_NV2, kMaxNV4 = BENCHLIB_NV4,
              kMaxNV8 = BENCHLIB_NV8;
constexpr int kMaxTile = 8 * 16;  // floats: the widest tile of any ISA
constexpr int64_t kRowCost = 4;   // a row's fixed cost (stores, loop), in entries
#ifndef BENCHLIB_TILES_PER_THREAD
#define BENCHLIB_TILES_PER_THREAD 6
#endif
constexpr int64_t kMinTilesPerThread = BENCHLIB_TILES_PER_THREAD;  // to split columns
constexpr int64_t kMinParallelWork = 1 << 15;  // multiply-adds below which one thread runs

template <int R>
constexpr int max_nv() {
  return R == 1 ? kMaxNV1 : R == 2 ? kMaxNV2 : R == 4 ? kMaxNV4 : kMaxNV8;
}

struct Problem {
  const int32_t* rowptr;  // block rows + 1
  const int32_t* off;     // per entry
  const float* val;       // per entry, R values (entry-major)
  const float* bias;      // M values or null
  int64_t block_rows;
  const float* x;
  int64_t x_image;  // floats between images of X
  int64_t images;
  int64_t n;        // columns computed per image
  int64_t pitch;    // columns per padded row of the computed range
  int64_t row_len;  // leading columns of each padded row that are output
  int64_t out_pitch;  // floats between output rows (row_len: packed)
  float* y;
  int64_t y_image;  // floats between images of Y
  int64_t ldy;      // floats between rows of Y
  bool relu;
  const float* residual;  // null, or added before the ReLU: laid out as Y (direct form only);
                          // Y itself may be it: a tile reads its residual before it writes
  const int32_t* ksplit;  // null, or per column block the block_rows + 1 bounds of its rows
  int64_t kblocks;
  int64_t parts;   // parts of n columns per image (see the top of this file)
  int64_t x_part;  // floats between parts of X
  int64_t y_part;  // floats between parts of Y (and of the residual)
  bool in_order;   // threads take equal runs of the column tiles, in order (see run_gather)
  const int32_t* groups;  // null, or per segment its shift groups' shifts + 1 bounds (below)
  int64_t shifts;         // shift groups per segment (1-4)
  int64_t x_copies;       // copies of X, one per thread (1: the threads share X; see copy_of)
  int64_t x_copy;         // floats between the copies of X
};

// The problem as thread t runs it: reading copy t % x_copies of X. A conv run by itself
// copies its input into its zero-padded layout just before the product (benchlib/sparse/
// direct.py's RowParts.copies); where the product splits the block rows, each thread reads
// all of that copy, and one copy written half by each thread moves half of it to the other
// core's cache, then back when the next call writes it. Each thread writing and reading a
// copy of its own moves nothing (measured: benchlib/sparse/plans.py's COPIES_THREADS).
inline Problem copy_of(const Problem& p, int64_t t) {
  Problem own = p;
  if (p.x_copies > 1) own.x = p.x + (t % p.x_copies) * p.x_copy;
  return own;
}

// The vectors of a tile: vector v starts at column v * W. With a tail (a tile of cols not a
// multiple of W) the last vector starts at cols - W instead, overlapping the one before it:
// the overlapped columns get the same sums in the same order, so both stores write the same
// values, and every move is a full one (AVX2's masked moves are microcoded on AMD's cores: see
// common.h). Only a tile narrower than one vector (a row of fewer than W columns) masks its
// vector.
struct Tail {
  VM mask;       // the tile's columns in its one vector (NV == 1)
  int64_t last;  // where the last vector starts (NV > 1)
};

template <int NV, bool TAIL>
inline VT vload(const float* base, int v, const Tail& t) {
  if (TAIL && v == NV - 1) return NV == 1 ? V::loadm(base, t.mask) : V::load(base + t.last);
  return V::load(base + v * V::W);
}

template <int NV, bool TAIL>
inline void vstore(float* base, int v, VT s, const Tail& t) {
  if (TAIL && v == NV - 1) {
    if (NV == 1)
      V::storem(base, s, t.mask);
    else
      V::store(base + t.last, s);
    return;
  }
  V::store(base + v * V::W, s);
}

// Entries [begin, end) of one block row into NV vectors x R rows of accumulators; U > 1
// splits the entries over U sets of accumulators (summed at the end) so that a narrow tile
// still has enough independent FMA chains to hide the FMA latency.
// ACC: start from the partial sums in out (a later block of columns), not from bias + res.
template <int R, int NV, int U, bool TAIL, bool ACC = false>
inline void tile(const Problem& p, int64_t begin, int64_t end, const float* x, const Tail& tail,
                 const float* bias, float* out, int64_t ldo, const float* res, bool relu) {
  VT acc[U][R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const VT b = V::set1(bias ? bias[r] : 0.0f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[0][r][v] = b;
      if (ACC)
        acc[0][r][v] = vload<NV, TAIL>(out + r * ldo, v, tail);
      else if (res)
        acc[0][r][v] = V::add(b, vload<NV, TAIL>(res + r * ldo, v, tail));
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) acc[u][r][v] = V::zero();
    }
  }
  const int32_t* off = p.off;
  const float* val = p.val;
  int64_t j = begin;
  for (; j + U <= end; j += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const float* xp = x + off[j + u];
      VT xv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = vload<NV, TAIL>(xp, v, tail);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const VT w = V::set1(val[(j + u) * R + r]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][r][v] = V::fma(w, xv[v], acc[u][r][v]);
      }
    }
  }
  for (; j < end; ++j) {
    const float* xp = x + off[j];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const VT xv = vload<NV, TAIL>(xp, v, tail);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[0][r][v] = V::fma(V::set1(val[j * R + r]), xv, acc[0][r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      VT s = acc[0][r][v];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) s = V::add(s, acc[u][r][v]);
      if (relu) s = V::relu(s);
      vstore<NV, TAIL>(out + r * ldo, v, s, tail);
    }
  }
}

// Whether a tile's columns are written where they are computed (the direct form): no dropped
// columns, and packed output rows or a part of one row.
inline bool direct_form(const Problem& p) {
  return p.pitch == p.row_len && (p.out_pitch == p.row_len || p.n <= p.row_len);
}

// Copies the computed columns [q0, q0 + cols) of one row (in padded-row space) to the output
// row, dropping the columns q % pitch >= row_len, output rows out_pitch floats apart.
inline void scatter(const float* tmp, int64_t q0, int64_t cols, int64_t pitch, int64_t row_len,
                    int64_t out_pitch, float* yrow) {
  int64_t oh = q0 / pitch, ow = q0 % pitch, done = 0;
  while (done < cols) {
    const int64_t seg = std::min(pitch - ow, cols - done);
    const int64_t keep = std::max<int64_t>(0, std::min(seg, row_len - ow));
    if (keep > 0) copy_floats(yrow + oh * out_pitch + ow, tmp + done, keep);
    done += seg;
    ++oh;
    ow = 0;
  }
}

// One column tile [q0, q0 + cols) of image data x / y for the block rows [i0, i1): the tile
// kernel inlined into the row loop (one indirect call per tile, not per row).
template <int R, int NV, int U, bool TAIL>
void tile_rows(const Problem& p, int64_t i0, int64_t i1, const float* x, float* y,
               const float* res, int64_t q0, int64_t cols, const Tail& tail, float* tmp,
               int64_t tw) {
  const bool direct = direct_form(p);
  if (p.ksplit) {
    // Column blocks outer: the rows' entries on one block of X's rows (a strip that stays in
    // L1), the partial sums kept between blocks in Y (direct form) or in tmp, which then
    // holds (i1 - i0) * R rows of tw floats, scattered at the end.
    const int64_t kb_count = p.kblocks, last = kb_count - 1;
    for (int64_t kb = 0; kb < kb_count; ++kb) {
      for (int64_t i = i0; i < i1; ++i) {
        const int32_t* ks = p.ksplit + kb * (p.block_rows + 1) + i;
        const int64_t at = i * R * p.ldy + q0;
        float* o = direct ? y + at : tmp + (i - i0) * R * tw;
        const int64_t ldo = direct ? p.ldy : tw;
        const bool relu = p.relu && kb == last;
        if (kb == 0)
          tile<R, NV, U, TAIL, false>(p, ks[0], ks[1], x + q0, tail,
                                      p.bias ? p.bias + i * R : nullptr, o, ldo,
                                      direct && res ? res + at : nullptr, relu);
        else
          tile<R, NV, U, TAIL, true>(p, ks[0], ks[1], x + q0, tail, nullptr, o, ldo, nullptr,
                                     relu);
      }
    }
    if (!direct)
      for (int64_t i = i0; i < i1; ++i)
        for (int r = 0; r < R; ++r)
          scatter(tmp + ((i - i0) * R + r) * tw, q0, cols, p.pitch, p.row_len, p.out_pitch,
                  y + (i * R + r) * p.ldy);
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const float* bias = p.bias ? p.bias + i * R : nullptr;
    if (direct) {
      const int64_t at = i * R * p.ldy + q0;
      tile<R, NV, U, TAIL>(p, p.rowptr[i], p.rowptr[i + 1], x + q0, tail, bias, y + at, p.ldy,
                           res ? res + at : nullptr, p.relu);
    } else {
      tile<R, NV, U, TAIL>(p, p.rowptr[i], p.rowptr[i + 1], x + q0, tail, bias, tmp, tw,
                           nullptr, p.relu);
      for (int r = 0; r < R; ++r)
        scatter(tmp + r * tw, q0, cols, p.pitch, p.row_len, p.out_pitch,
                y + (i * R + r) * p.ldy);
    }
  }
}

#if defined(__AVX512F__)
// Shift groups (AVX-512, R = 1, the scatter form; optional): a kxk conv whose source rows are
// vector-aligned reads each entry at an offset off = a + s with a a multiple of 16 floats and
// s < 16 the entry's column tap (0-2 for a 3x3 conv; 0-1 in a 3x3/2 conv's phase images), so
// that a tile's loads at x + off straddle two cache lines for every s > 0. Within each segment
// (one block row's entries on one column block: kb * block_rows + i) the entries come sorted
// by s, groups[seg * (shifts + 1) + g] the first entry of shift g (the last bound the
// segment's end). Shift 0 accumulates as usual; shift s into its own vectors over the columns
// [0, cols + s) of the aligned base x + a, loaded aligned, which the tile's vectors then take
// shifted by s lanes (valignd: one per vector and group, against two loads an entry).

inline __mmask16 lanes(int64_t n) {  // the first n lanes, n clamped to [0, 16]
  return n >= 16 ? static_cast<__mmask16>(0xFFFF)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1u);
}

// The entries [j0, j1) of shift SH, added into the NV vectors of acc (a tile of cols columns,
// cols > 16 * (NV - 1)). Loads past the column range are masked off (they may lie past the
// source's end).
template <int NV, int SH>
inline void add_shift_group(const int32_t* off, const float* val, int64_t j0, int64_t j1,
                            const float* x, int64_t cols, __m512 (&acc)[NV]) {
  constexpr int G = NV + (SH > 0 ? 1 : 0);  // vectors over [0, cols + SH)
  const __mmask16 m2 = lanes(cols + SH - 16 * (G - 2)), m1 = lanes(cols + SH - 16 * (G - 1));
  __m512 g[G];
  if (SH == 0) {
#pragma GCC unroll 9
    for (int v = 0; v < G; ++v) g[v] = acc[v < NV ? v : 0];
  } else {
#pragma GCC unroll 9
    for (int v = 0; v < G; ++v) g[v] = _mm512_setzero_ps();
  }
  for (int64_t j = j0; j < j1; ++j) {
    const float* xp = x + off[j] - SH;
    const __m512 w = _mm512_set1_ps(val[j]);
#pragma GCC unroll 9
    for (int v = 0; v < G; ++v) {
      __m512 xv;
      if (v < G - 2)
        xv = _mm512_loadu_ps(xp + 16 * v);
      else
        xv = _mm512_maskz_loadu_ps(v == G - 1 ? m1 : m2, xp + 16 * v);
      g[v] = _mm512_fmadd_ps(w, xv, g[v]);
    }
  }
  if (SH == 0) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = g[v];
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      acc[v] = _mm512_add_ps(acc[v], _mm512_castsi512_ps(_mm512_alignr_epi32(
                                         _mm512_castps_si512(g[v + 1]),
                                         _mm512_castps_si512(g[v]), SH)));
  }
}

// One segment's entries, by shift group (bounds: its shifts + 1 group bounds), into the NV
// vectors of out (tmp rows, full vectors). ACC: start from out (a later column block).
template <int NV, bool ACC>
inline void tile_shifted(const Problem& p, const int32_t* bounds, const float* x, int64_t cols,
                         const float* bias, float* out, bool relu) {
  __m512 acc[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
    acc[v] = ACC ? _mm512_loadu_ps(out + 16 * v) : _mm512_set1_ps(bias ? *bias : 0.0f);
  add_shift_group<NV, 0>(p.off, p.val, bounds[0], bounds[1], x, cols, acc);
  if (p.shifts > 1) add_shift_group<NV, 1>(p.off, p.val, bounds[1], bounds[2], x, cols, acc);
  if (p.shifts > 2) add_shift_group<NV, 2>(p.off, p.val, bounds[2], bounds[3], x, cols, acc);
  if (p.shifts > 3) add_shift_group<NV, 3>(p.off, p.val, bounds[3], bounds[4], x, cols, acc);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + 16 * v, relu ? V::relu(acc[v]) : acc[v]);
}

// tile_rows for shift groups (R = 1, the scatter form): the column blocks outer as there.
template <int NV>
void tile_rows_shifted(const Problem& p, int64_t i0, int64_t i1, const float* x, float* y,
                       const float*, int64_t q0, int64_t cols, const Tail&, float* tmp,
                       int64_t tw) {
  const int64_t stride = p.shifts + 1, last = p.kblocks - 1;
  for (int64_t kb = 0; kb < p.kblocks; ++kb) {
    for (int64_t i = i0; i < i1; ++i) {
      const int32_t* bounds = p.groups + (kb * p.block_rows + i) * stride;
      float* o = tmp + (p.ksplit ? (i - i0) * tw : 0);
      const bool relu = p.relu && kb == last;
      if (kb == 0)
        tile_shifted<NV, false>(p, bounds, x + q0, cols, p.bias ? p.bias + i : nullptr, o, relu);
      else
        tile_shifted<NV, true>(p, bounds, x + q0, cols, nullptr, o, relu);
      if (!p.ksplit)
        scatter(o, q0, cols, p.pitch, p.row_len, p.out_pitch, y + i * p.ldy);
    }
  }
  if (p.ksplit)
    for (int64_t i = i0; i < i1; ++i)
      scatter(tmp + (i - i0) * tw, q0, cols, p.pitch, p.row_len, p.out_pitch, y + i * p.ldy);
}
#endif

using TileFn = void (*)(const Problem&, int64_t, int64_t, const float*, float*, const float*,
                        int64_t, int64_t, const Tail&, float*, int64_t);

template <int R, int NV, bool TAIL>
constexpr TileFn tile_fn() {
  constexpr int chains = R * NV;
  constexpr int U = chains >= 4 ? 1 : chains >= 2 ? 2 : 4;
  return &tile_rows<R, NV, U, TAIL>;
}

template <int R, int NV>
struct Table {
  static TileFn get(int nv, bool tail) {
    if (nv == NV) return tail ? tile_fn<R, NV, true>() : tile_fn<R, NV, false>();
    return Table<R, NV - 1>::get(nv, tail);
  }
};
template <int R>
struct Table<R, 0> {
  static TileFn get(int, bool) { return nullptr; }
};

#if defined(__AVX512F__)
template <int NV>
struct ShiftedTable {
  static TileFn get(int nv) {
    return nv == NV ? &tile_rows_shifted<NV> : ShiftedTable<NV - 1>::get(nv);
  }
};
template <>
struct ShiftedTable<0> {
  static TileFn get(int) { return nullptr; }
};
#endif

// Whether a problem's tiles run by shift groups (see tile_shifted).
inline bool shifted(const Problem& p, int R) {
#if defined(__AVX512F__)
  return R == 1 && p.groups && !direct_form(p);
#else
  (void)p, (void)R;
  return false;
#endif
}

// Block rows [i0, i1) over the column tiles [u0, u1) of all images' parts (unit u: part
// u / tiles, counted over the images, tile u % tiles): tiles outer, rows inner, so a tile's
// strip of X serves every row.
// rows_tmp: the calling thread's buffer for the partial sums of every row (column blocks in
// the scatter form), grown as needed and kept across its claims.
template <int R>
void block_rows(const Problem& p, int64_t i0, int64_t i1, int64_t u0, int64_t u1,
                std::vector<float>& rows_tmp) {
  constexpr int NVMAX = max_nv<R>();
  constexpr int64_t TW = NVMAX * V::W;
  const int64_t tiles = (p.n + TW - 1) / TW;
  alignas(64) float small[R * kMaxTile];
  float* tmp = small;
  const bool by_shift = shifted(p, R);
  if (p.ksplit && !direct_form(p)) {
    const size_t need = static_cast<size_t>((i1 - i0) * R * TW);
    if (rows_tmp.size() < need) rows_tmp.resize(need);
    tmp = rows_tmp.data();
  }
  // A last tile narrower than one vector takes the last vector of the tile before it, so that
  // its tail vector has a full one to overlap (see Tail); with one-vector tiles it stays masked.
  const int64_t last_cols = p.n - (tiles - 1) * TW;
  const bool borrow = NVMAX > 1 && tiles > 1 && last_cols < V::W;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t part = u / tiles, t = u % tiles;
    const int64_t b = part / p.parts, at = part % p.parts;
    int64_t q0 = t * TW, cols = std::min(TW, p.n - q0);
    if (borrow && t == tiles - 2) cols -= V::W;
    if (borrow && t == tiles - 1) {
      q0 -= V::W;
      cols += V::W;
    }
    const int nv = static_cast<int>((cols + V::W - 1) / V::W);
    const int rest = static_cast<int>(cols - (nv - 1) * V::W);  // columns in the last vector
    const Tail tail{V::mask(rest), cols - V::W};
    const int64_t y_at = b * p.y_image + at * p.y_part;
    const float* res = p.residual ? p.residual + y_at : nullptr;
    TileFn fn = nullptr;
#if defined(__AVX512F__)
    if (by_shift) fn = ShiftedTable<NVMAX>::get(nv);
#else
    (void)by_shift;
#endif
    if (!fn) fn = Table<R, NVMAX>::get(nv, rest != V::W);
    fn(p, i0, i1, p.x + b * p.x_image + at * p.x_part, p.y + y_at, res, q0, cols, tail, tmp, TW);
  }
}

// The cost of the block rows [0, i): entries + kRowCost per row.
inline int64_t row_cost(const int32_t* rowptr, int64_t i) { return rowptr[i] + kRowCost * i; }

// The first block row at or after `goal` of the cost (nondecreasing, as rowptr is).
int64_t first_row_at(const int32_t* rowptr, int64_t rows, int64_t goal) {
  int64_t lo = 0, hi = rows;  // first i with cost(i) >= goal
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (row_cost(rowptr, mid) < goal)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// The first block row of thread t's share when `parts` threads split the block rows into
// ranges of equal cost (entries + kRowCost per row); rowptr is nondecreasing, so is the cost.
int64_t split(const int32_t* rowptr, int64_t rows, int64_t t, int64_t parts) {
  if (t <= 0) return 0;
  if (t >= parts) return rows;
  return first_row_at(rowptr, rows, row_cost(rowptr, rows) * t / parts);
}

// Runs body(t, begin, end) over pieces [0, pieces) on `threads` threads (t in [0, threads):
// the thread) that claim them in a guided schedule: each claim takes the remaining pieces over
// twice the threads (at least one), so the first claims are large and the last ones small, and
// a thread that runs faster (its vCPU not descheduled, on a shared VM) takes over the rest
// instead of waiting.
template <typename Body>
void guided(int64_t pieces, int threads, const Body& body) {
  std::atomic<int64_t> next{0};
  parallel_rows(pieces, threads, [&](int64_t t, int64_t parts) {
    for (;;) {
      int64_t begin = next.load(std::memory_order_relaxed), end = 0;
      do {
        const int64_t left = pieces - begin;
        if (left <= 0) return;
        end = begin + std::max<int64_t>(1, left / (2 * parts));
      } while (!next.compare_exchange_weak(begin, end, std::memory_order_relaxed));
      body(t, begin, end);
    }
  });
}

// The row split's shares follow the threads' speeds, learned from their last calls: on a
// shared VM one vCPU at times runs slower than the other for seconds (another tenant's load),
// and equal shares then wait for the slow one. Measured on the AVX2 EPYC, 2 threads, equal
// shares: ResNet-50's 1x1 convs at 14x14 and 7x7 kept thread 0 busy 1.25-1.33x as long as
// thread 1 in one such phase; over windows of 40 inferences of ResNet-50 magnitude:0.9, its
// 28 row-split calls (8-10 ms of about 25) kept thread 0 busy 1.00x, 1.21x and 1.37x as long.
// Learned shares ran end to end in 0.993x the time of equal ones (in-process A/B, 60
// alternating rounds; 0.987x with half steps and goals clamped to [1/4, 4], which one noisy
// call moves further). After each call, each thread's weight moves a quarter of the way to its
// rate (cost / busy seconds) over the mean rate, clamped to [1/2, 2]; the next call
// gives each thread a share of the cost in proportion to its weight. One table for the
// process: the speeds are the vCPUs', not a layer's; a race between two concurrent calls only
// blurs the estimate, and the results never depend on the split (each row is computed whole
// by one thread).
constexpr int kMaxWeighted = 64;  // threads beyond this split equally
std::atomic<float> g_weight[kMaxWeighted];  // 0: never measured, counts as 1

float weight_of(int t) {
  const float w = g_weight[t].load(std::memory_order_relaxed);
  return w > 0.0f ? w : 1.0f;
}

// What one thread did in one row-split call: the cost of its rows, in how many seconds.
struct Share {
  int64_t cost = 0;
  double seconds = 0.0;
};

// Moves each thread's weight a quarter of the way to its rate over the mean rate (clamped to
// [1/2, 2]); needs two threads that did some work.

void learn_weights(const Share* shares, int parts) {
  double rates[kMaxWeighted], mean = 0.0;
  int measured = 0;
  for (int t = 0; t < parts; ++t) {
    const Share& share = shares[t];
    rates[t] = share.cost > 0 && share.seconds > 0 ? share.cost / share.seconds : 0.0;
    if (rates[t] > 0) mean += rates[t], ++measured;
  }
  if (measured < 2) return;
  mean /= measured;
  for (int t = 0; t < parts; ++t) {
    if (rates[t] <= 0) continue;
    const float goal = std::min(2.0f, std::max(0.5f, static_cast<float>(rates[t] / mean)));
    const float w = 0.75f * weight_of(t) + 0.25f * goal;
    g_weight[t].store(w, std::memory_order_relaxed);
  }
}

// Threads claim the column tiles when there are many (each thread then reads only its part of
// X; guided: 1.0-1.17x the speed of equal static shares on the 56x56 and 28x28 layers), else
// split the block rows by cost in proportion to the threads' learned speeds, statically (each
// reads all of X, so every extra claim reads it again: row chunks claimed guided measured
// 0.98x end to end). Tiny products run on one thread. in_order: thread t takes the t-th of
// equal runs of the tiles, in order, so that it reads only the rows of X its part needs (see
// benchlib/sparse/tiling.py's output_halves and bands.py's in_order): where the threads
// divide the parts (images * parts), each takes whole parts; else the tiles are claimed or
// the rows split as without (two parts on four threads would leave two of them idle).
template <int R>
void run_gather(const Problem& p, int threads) {
  constexpr int64_t TW = max_nv<R>() * V::W;
  const int64_t units = p.images * p.parts * ((p.n + TW - 1) / TW);
  const int64_t work = (p.rowptr[p.block_rows] * R + p.block_rows) * p.n * p.images * p.parts;
  if (work < kMinParallelWork) threads = 1;
  const bool in_order = p.in_order && threads > 1 && (p.images * p.parts) % threads == 0;
  if (in_order || units >= kMinTilesPerThread * threads) {
    std::vector<std::vector<float>> buffers(static_cast<size_t>(threads));
    const auto tiles = [&](int64_t t, int64_t u0, int64_t u1) {
      block_rows<R>(copy_of(p, t), 0, p.block_rows, u0, u1, buffers[static_cast<size_t>(t)]);
    };
    if (in_order)
      parallel_rows(units, threads, [&](int64_t t, int64_t parts) {
        tiles(t, units * t / parts, units * (t + 1) / parts);
      });
    else
      guided(units, threads, tiles);
    return;
  }
  double before[kMaxWeighted + 1] = {0.0};  // cumulative weights, the same for every thread
  for (int t = 0; t < kMaxWeighted; ++t) before[t + 1] = before[t] + weight_of(t);
  const double total = static_cast<double>(row_cost(p.rowptr, p.block_rows));
  Share shares[kMaxWeighted];
  int team = 1;
  parallel_rows(p.block_rows, threads, [&](int64_t t, int64_t parts) {
    const bool weighted = parts > 1 && parts <= kMaxWeighted;
    const auto first_row = [&](int64_t u) {  // thread u's: its share, weight u / all weights
      if (!weighted) return split(p.rowptr, p.block_rows, u, parts);
      if (u <= 0) return int64_t{0};
      if (u >= parts) return p.block_rows;
      const double goal = total * (before[u] / before[parts]);
      return first_row_at(p.rowptr, p.block_rows, static_cast<int64_t>(goal));
    };
    const int64_t i0 = first_row(t), i1 = first_row(t + 1);
    const auto start = std::chrono::steady_clock::now();
    std::vector<float> buffer;
    if (i0 < i1) block_rows<R>(copy_of(p, t), i0, i1, 0, units, buffer);
    if (weighted) {
      Share& share = shares[t];
      share.cost = row_cost(p.rowptr, i1) - row_cost(p.rowptr, i0);
      share.seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (t == 0) team = static_cast<int>(parts);
    }
  });
  if (team > 1) learn_weights(shares, team);
}

// Small batch, X row-major: four partial sums per (row, image) over the entries; for R = 1
// with AVX-512 / AVX2, 16 / 8 entries at a time into one vector and one FMA. AVX-512 reads
// x by a gather; AVX2 by eight scalar loads assembled into the vector (set_ps), as AVX2's
// vgatherdps is microcoded on AMD's cores: on the Zen 3 EPYC, 2048 -> 1000 at batch 1, one
// thread, set_ps took 0.64-0.66x the time of the gather at 90% and 50% sparsity (a
// standalone A/B of the two loops; plain scalar code took 0.84-0.89x). AMD's AVX-512 gather
// is no faster: compiled for a Zen core (-march=native defines __znverN__), the AVX-512 build
// takes the AVX2 loop too. On the Zen 4 EPYC VM, 2048 -> 1000 at 90%, batch 1: one thread
// 72 us against 88 with the gather; `benchmarks/sparse_kernels.py` 39-43 us against 47-57
// (2 threads), 3.44-3.64x dense against 3.04-3.17x.
#if defined(__znver1__) || defined(__znver2__) || defined(__znver3__) || \
    defined(__znver4__) || defined(__znver5__)
#define BENCHLIB_SLOW_GATHER 1
#else
#define BENCHLIB_SLOW_GATHER 0
#endif
template <int R>
void rows_range(const Problem& p, int64_t i0, int64_t i1) {
  const int32_t* off = p.off;
  const float* val = p.val;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t begin = p.rowptr[i], end = p.rowptr[i + 1];
    for (int64_t b = 0; b < p.images; ++b) {
      const float* x = p.x + b * p.x_image;
      float s[4][R] = {};
      int64_t j = begin;
#if defined(__AVX512F__) && !BENCHLIB_SLOW_GATHER
      if (R == 1) {  // 16 entries at a time: one gather of x, one FMA
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
        for (; j + 64 <= end; j += 64) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u) {
            const __m512i k = _mm512_loadu_si512(off + j + 16 * u);
            const __m512 xs = _mm512_i32gather_ps(k, x, 4);
            a[u] = _mm512_fmadd_ps(_mm512_loadu_ps(val + j + 16 * u), xs, a[u]);
          }
        }
        for (; j + 16 <= end; j += 16) {
          const __m512i k = _mm512_loadu_si512(off + j);
          a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(val + j), _mm512_i32gather_ps(k, x, 4), a[0]);
        }
        const __m512 sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        s[1][0] = _mm512_reduce_add_ps(sum);
      }
#elif defined(__AVX2__) && defined(__FMA__)
      if (R == 1) {  // 8 entries at a time: eight loads of x into one vector, one FMA
        const auto xs = [x, off](int64_t at) {
          const int32_t* k = off + at;
          return _mm256_setr_ps(x[k[0]], x[k[1]], x[k[2]], x[k[3]], x[k[4]], x[k[5]], x[k[6]],
                                x[k[7]]);
        };
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                       _mm256_setzero_ps()};
        for (; j + 32 <= end; j += 32) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u)
            a[u] = _mm256_fmadd_ps(_mm256_loadu_ps(val + j + 8 * u), xs(j + 8 * u), a[u]);
        }
        for (; j + 8 <= end; j += 8) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(val + j), xs(j), a[0]);
        const __m256 t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        s[1][0] = _mm_cvtss_f32(h);
      }
#endif
      for (; j + 4 <= end; j += 4) {
        for (int u = 0; u < 4; ++u) {
          const float xv = x[off[j + u]];
          for (int r = 0; r < R; ++r) s[u][r] += val[(j + u) * R + r] * xv;
        }
      }
      for (; j < end; ++j) {
        const float xv = x[off[j]];
        for (int r = 0; r < R; ++r) s[0][r] += val[j * R + r] * xv;
      }
      for (int r = 0; r < R; ++r) {
        const float sum = (s[0][r] + s[1][r]) + (s[2][r] + s[3][r]);
        float out = (p.bias ? p.bias[i * R + r] : 0.0f) + sum;
        if (p.relu && out < 0.0f) out = 0.0f;
        p.y[b * p.y_image + i * R + r] = out;
      }
    }
  }
}

template <int R>
void run_rows(const Problem& p, int threads) {
  if ((p.rowptr[p.block_rows] * R + p.block_rows) * p.images < kMinParallelWork) threads = 1;
  // rows claimed in a guided schedule over 8 pieces per thread: every claim reads all of x,
  // which is small (measured 2048 -> 1000, batch 1: 1.13x / 1.07x the speed of equal static
  // shares at 50% / 70% sparsity, the same at 90%)
  const int64_t pieces = 8 * static_cast<int64_t>(threads);
  guided(pieces, threads, [&](int64_t, int64_t c0, int64_t c1) {
    const int64_t i0 = split(p.rowptr, p.block_rows, c0, pieces);
    const int64_t i1 = split(p.rowptr, p.block_rows, c1, pieces);
    if (i0 < i1) rows_range<R>(p, i0, i1);
  });
}

template <template <int> class F>
int dispatch(int64_t R, const Problem& p, int threads) {
  switch (R) {
    case 1: F<1>::run(p, threads); return 0;
    case 2: F<2>::run(p, threads); return 0;
    case 4: F<4>::run(p, threads); return 0;
    case 8: F<8>::run(p, threads); return 0;
    default: return 1;
  }
}

template <int R>
struct Gather {
  static void run(const Problem& p, int threads) { run_gather<R>(p, threads); }
};
template <int R>
struct Rows {
  static void run(const Problem& p, int threads) { run_rows<R>(p, threads); }
};

}  // namespace

extern "C" {

// The instruction set the kernels were compiled for: "avx512", "avx2" or "generic".
const char* benchlib_spmm_isa() { return kIsa; }

// The row split's learned thread weights (see run_gather): the first n (at most 64) are
// copied to `read` when it is not null, then set from `write` when it is not null (a
// weight <= 0 resets that thread to 1). For tests and diagnostics; returns n, clamped.
int benchlib_split_weights(const float* write, float* read, int n) {
  n = std::max(0, std::min(n, kMaxWeighted));
  for (int t = 0; t < n; ++t) {
    if (read) read[t] = weight_of(t);
    if (write) g_weight[t].store(write[t] > 0.0f ? write[t] : 0.0f, std::memory_order_relaxed);
  }
  return n;
}

// Gather form (see the top of this file). y must hold images * y_image floats; for every
// entry, off + n - 1 must lie inside X's image (the caller checks). A residual (laid out as y;
// direct form, pitch == row_len, only: else 2 is returned; y itself too: each tile reads its
// residual before it writes) is added before the ReLU. ksplit (null, or ignored when kblocks
// < 1) holds per block of columns the block_rows + 1 entry bounds of its block rows, the
// entries (off, val) ordered block-major: entry j of row i lies in block kb when
// ksplit[kb * (block_rows + 1) + i] <= j < ksplit[kb * (block_rows + 1) + i + 1]; the blocks
// run outer over each tile. parts (at least 1; 0 counts as 1) parts of n columns per image,
// x_part and y_part floats apart, output rows out_pitch floats apart (0: row_len) (see the
// top of this file). in_order != 0: the threads take equal runs of the column tiles in order
// (see run_gather). groups (null, or ignored unless 1 <= shifts <= 4): the entries sorted by
// shift within each segment and the groups' bounds (see tile_shifted; AVX-512, R = 1, the
// scatter form only: elsewhere the segments run as usual). x_copies (0 counts as 1) copies of
// X, x_copy floats apart (within each image's x_image floats): thread t reads copy
// t % x_copies (see copy_of).
int benchlib_spmm_gather(const int32_t* rowptr, const int32_t* off, const float* val,
                         const float* bias, int64_t block_rows, int64_t R, const float* x,
                         int64_t x_image, int64_t images, int64_t n, int64_t pitch,
                         int64_t row_len, float* y, int64_t y_image, int64_t ldy, int relu,
                         const float* residual, const int32_t* ksplit, int64_t kblocks,
                         int threads, int64_t parts, int64_t x_part, int64_t y_part,
                         int64_t out_pitch, int64_t in_order, const int32_t* groups,
                         int64_t shifts, int64_t x_copies, int64_t x_copy) {
  if (out_pitch <= 0) out_pitch = row_len;
  // the residual is added in the direct form only
  if (residual && (pitch != row_len || out_pitch != row_len)) return 2;
  if (kblocks < 1) ksplit = nullptr;
  const Problem p{rowptr,    off,      val,       bias,     block_rows, x,
                  x_image,   images,   n,         pitch,    row_len,    out_pitch,
                  y,         y_image,  ldy,       relu != 0, residual,  ksplit,
                  ksplit ? kblocks : 1, std::max<int64_t>(1, parts), x_part, y_part,
                  in_order != 0, shifts >= 1 && shifts <= 4 ? groups : nullptr,
                  std::max<int64_t>(1, shifts), std::max<int64_t>(1, x_copies), x_copy};
  return dispatch<Gather>(R, p, threads);
}

// Rows form: Y[b][m] = act(bias[m] + sum_j val[j*R + r] * X[b*x_image + off[j]]), Y[b] at
// y + b * y_image (the small-batch linear layer: off = column index).
int benchlib_spmm_rows(const int32_t* rowptr, const int32_t* off, const float* val,
                       const float* bias, int64_t block_rows, int64_t R, const float* x,
                       int64_t x_image, int64_t images, float* y, int64_t y_image, int relu,
                       int threads) {
  const Problem p{rowptr, off, val, bias, block_rows, x, x_image, images, 1, 1, 1, 1, y,
                  y_image, 1,  relu != 0, nullptr, nullptr, 1, 1, 0, 0, false, nullptr, 1, 1, 0};
  return dispatch<Rows>(R, p, threads);
}

// The two functions above with their arguments packed in one array, in the same order (see
// packed_ptr): Python's ctypes converts one argument per call instead of 13 or 25, about
// 0.3-0.5 us each.
int benchlib_spmm_gather_packed(const int64_t* a) {
  return benchlib_spmm_gather(packed_ptr<const int32_t>(a, 0), packed_ptr<const int32_t>(a, 1),
                              packed_ptr<const float>(a, 2), packed_ptr<const float>(a, 3), a[4],
                              a[5], packed_ptr<const float>(a, 6), a[7], a[8], a[9], a[10],
                              a[11], packed_ptr<float>(a, 12), a[13], a[14],
                              static_cast<int>(a[15]), packed_ptr<const float>(a, 16),
                              packed_ptr<const int32_t>(a, 17), a[18], static_cast<int>(a[19]),
                              a[20], a[21], a[22], a[23], a[24],
                              packed_ptr<const int32_t>(a, 25), a[26], a[27], a[28]);
}

int benchlib_spmm_rows_packed(const int64_t* a) {
  return benchlib_spmm_rows(packed_ptr<const int32_t>(a, 0), packed_ptr<const int32_t>(a, 1),
                            packed_ptr<const float>(a, 2), packed_ptr<const float>(a, 3), a[4],
                            a[5], packed_ptr<const float>(a, 6), a[7], a[8],
                            packed_ptr<float>(a, 9), a[10], static_cast<int>(a[11]),
                            static_cast<int>(a[12]));
}

}  // extern "C"
