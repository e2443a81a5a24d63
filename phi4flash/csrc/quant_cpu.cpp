// phi4flash's CPU kernels for weight-only quantized linears: matrix-vector products for decode that stream
// the packed weights once at memory speed, and dequantization to bfloat16 (all rows for prefill's dense
// matmul, or a few rows for the embedding lookup); plus the bfloat16 matrix-vector product of decode.
//
// Layout ("row tiles", built by phi4flash/qkernels.py): the weight's rows go in tiles of 16, and a tile is a
// run of 64-byte vectors, one per chunk of inputs; lane i (4 bytes) of a vector belongs to row 16 t + i, so
// that one integer dot-product instruction advances 16 rows at once and the outputs need no horizontal sums.
//   int4: chunk c = inputs 8c .. 8c+7; byte j of a lane = q[8c + j] | q[8c + 4 + j] << 4, q in [0, 15];
//         scales, zeros (N/16, K/g, 16) bfloat16; weight = (q - 8) s + z.
//   int8: chunk c = inputs 4c .. 4c+3; byte j of a lane = q[4c + j] + 128; scales (N,) bfloat16; weight = q s.
// Activations x (M, K) bfloat16 are quantized per block of 128 inputs to int8 (symmetric: a = max|x| / 127,
// xq = round(x / a)), as llama.cpp does, so that AVX512-VNNI's u8 x s8 dot products (vpdpbusd) do the work:
//   int4, per segment (the inputs one group and one block share):  a (s D + (z - 8 s) X)
//   int8, per block:  a (D - 128 X), times s at the end
// with D = sum(q xq) in int32 and X = sum(xq). Outputs (M, N) bfloat16, accumulated in float32.
// Without AVX512-VNNI, AVX2 does the same integer dot products in two 32-byte halves of each vector (vpmaddubsw
// then vpmaddwd; int8 weights as signed q in [-127, 127] against |xq|, the sign moved onto q, so that no
// 16-bit sum saturates), and without AVX2 plain C++ loops do.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PHI4FLASH_BF16_DOT 1
#define PHI4FLASH_BF16_DOT_ON true
#else
#define PHI4FLASH_BF16_DOT_ON false
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PHI4FLASH_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#define PHI4FLASH_AVX2 1
#endif

namespace phi4flash {
namespace {

constexpr int64_t kBlock = 128;  // inputs per activation block
constexpr int64_t kTile = 16;    // rows per tile

inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }


// x (M, K) quantized per block of 128 inputs; ``seg`` inputs per segment (min(group, 128); 128 for int8).
struct Activations {
  std::vector<int8_t> q;       // (M, K)
  std::vector<float> scale;    // (M, K / 128): a
  std::vector<float> seg_sum;  // (M, K / seg): a * sum(xq) over the segment
  std::vector<int32_t> block_sum;  // (M, K / 128): sum(xq) over the block
  int64_t seg;
};

Activations quantize_activations(const at::BFloat16* x, int64_t M, int64_t K, int64_t seg) {
  const int64_t B = K / kBlock, S = K / seg;
  Activations a{std::vector<int8_t>(M * K), std::vector<float>(M * B), std::vector<float>(M * S, 0.f),
                std::vector<int32_t>(M * B, 0), seg};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const at::BFloat16* xb = x + m * K + b * kBlock;
      int8_t* q = a.q.data() + m * K + b * kBlock;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      __m512 v[8];
      __m512 amax = _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        v[j] = load_bf16x16(xb + 16 * j);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
      }
      const float scale = _mm512_reduce_max_ps(amax) / 127.f;
      const __m512 sv = _mm512_set1_ps(scale);
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {  // round(x / scale), half to even, as torch.round
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v[j], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), scale > 0.f ? bytes : _mm_setzero_si128());
      }
#else
      float amax = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(to_float(xb[j])));
      const float scale = amax / 127.f;
      for (int64_t j = 0; j < kBlock; ++j)
        q[j] = scale > 0.f ? static_cast<int8_t>(std::nearbyint(to_float(xb[j]) / scale)) : 0;
#endif
      a.scale[m * B + b] = scale;
      for (int64_t j0 = 0; j0 < kBlock; j0 += seg) {
        int32_t sum = 0;
        for (int64_t j = j0; j < j0 + seg; ++j) sum += q[j];
        a.seg_sum[m * S + (b * kBlock + j0) / seg] = scale * static_cast<float>(sum);
        a.block_sum[m * B + b] += sum;
      }
    }
  return a;
}

// Software prefetch this far ahead of the weight stream: one core keeps more reads in flight than its hardware
// prefetcher does (measured: one thread streams int4 weights 1.2-1.4x faster).
constexpr int64_t kPrefetchBytes = 2048;

// four activation bytes, to broadcast to every lane
inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if PHI4FLASH_VNNI
constexpr const char* kQuantPath = "avx512-vnni";

// Tile ``tile`` (16 rows) against activation rows [m0, m0 + MT), int4 with segments of SEG_CHUNKS chunks.
// Four accumulators per activation row keep the dot products' dependency chains short.
template <int MT, int SEG_CHUNKS>
inline void int4_tile(const Activations& a, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
                      float* y, int64_t tile, int64_t m0, int64_t K, int64_t group) {
  const int64_t G = K / group, B = K / kBlock, S = K / a.seg, chunks = K / 8;
  const uint8_t* t = w + tile * kTile * (K / 2);
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512 total[MT];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += SEG_CHUNKS) {
    __m512i acc[MT][4];
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int v = 0; v < SEG_CHUNKS; ++v) {
      const __m512i wv = _mm512_loadu_si512(t + (c0 + v) * 64);
      _mm_prefetch(reinterpret_cast<const char*>(t + (c0 + v) * 64 + kPrefetchBytes), _MM_HINT_T0);
      const __m512i lo = _mm512_and_si512(wv, mask), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const int8_t* xp = a.q.data() + (m0 + m) * K + 8 * (c0 + v);
        acc[m][2 * (v & 1)] = _mm512_dpbusd_epi32(acc[m][2 * (v & 1)], lo, _mm512_set1_epi32(load_i32(xp)));
        acc[m][2 * (v & 1) + 1] = _mm512_dpbusd_epi32(acc[m][2 * (v & 1) + 1], hi, _mm512_set1_epi32(load_i32(xp + 4)));
      }
    }
    const int64_t k = 8 * c0, g = k / group, b = k / kBlock, s = k / a.seg;
    const __m512 sv = load_bf16x16(scales + (tile * G + g) * kTile);
    const __m512 zc = _mm512_fmadd_ps(sv, _mm512_set1_ps(-8.f), load_bf16x16(zeros + (tile * G + g) * kTile));
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m512i d = _mm512_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), _mm512_add_epi32(acc[m][2], acc[m][3]));
      const __m512 sa = _mm512_mul_ps(sv, _mm512_set1_ps(a.scale[(m0 + m) * B + b]));
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sa, total[m]);
      total[m] = _mm512_fmadd_ps(zc, _mm512_set1_ps(a.seg_sum[(m0 + m) * S + s]), total[m]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * kTile, total[m]);
}

// Tile ``tile`` against activation rows [m0, m0 + MT), int8: per block of 32 chunks, a D into the totals;
// the offset of the unsigned weights (128 X) and the row scales come at the end.
template <int MT>
inline void int8_tile(const Activations& a, const uint8_t* w, float* y, int64_t tile, int64_t m0, int64_t K) {
  const int64_t B = K / kBlock;
  const uint8_t* t = w + tile * kTile * K;
  __m512 total[MT];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m512i acc[MT][4];
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_si512();
#pragma GCC unroll 32
    for (int v = 0; v < 32; ++v) {
      const __m512i wv = _mm512_loadu_si512(t + (b * 32 + v) * 64);
      _mm_prefetch(reinterpret_cast<const char*>(t + (b * 32 + v) * 64 + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m)
        acc[m][v & 3] = _mm512_dpbusd_epi32(
            acc[m][v & 3], wv, _mm512_set1_epi32(load_i32(a.q.data() + (m0 + m) * K + b * kBlock + 4 * v)));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m512i d = _mm512_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), _mm512_add_epi32(acc[m][2], acc[m][3]));
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(a.scale[(m0 + m) * B + b]), total[m]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * kTile, total[m]);
}
#elif PHI4FLASH_AVX2
constexpr const char* kQuantPath = "avx2";

// u8 x s8 products of each 4-byte lane summed into its int32 lane (what vpdpbusd adds), for 16-bit pair sums
// that cannot saturate
inline __m256i dot_lanes(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// As the AVX-512 tile, in two halves: rows 0..7 of the tile in the first 32 bytes of each vector, 8..15 in the
// second. A chunk's low and high nibbles go through one 16-bit sum (at most 2 * 2 * 15 * 127).
template <int MT, int SEG_CHUNKS>
inline void int4_tile(const Activations& a, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
                      float* y, int64_t tile, int64_t m0, int64_t K, int64_t group) {
  const int64_t G = K / group, B = K / kBlock, S = K / a.seg, chunks = K / 8;
  const uint8_t* t = w + tile * kTile * (K / 2);
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 total[MT][2];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < chunks; c0 += SEG_CHUNKS) {
    __m256i acc[MT][2];
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int v = 0; v < SEG_CHUNKS; ++v) {
      const uint8_t* p = t + (c0 + v) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
      __m256i lo[2], hi[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
        lo[h] = _mm256_and_si256(wv, mask);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask);
      }
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const int8_t* xp = a.q.data() + (m0 + m) * K + 8 * (c0 + v);
        const __m256i xl = _mm256_set1_epi32(load_i32(xp)), xh = _mm256_set1_epi32(load_i32(xp + 4));
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], xl), _mm256_maddubs_epi16(hi[h], xh));
          acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    const int64_t k = 8 * c0, g = k / group, b = k / kBlock, s = k / a.seg;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m256 sv = load_bf16x8(scales + (tile * G + g) * kTile + 8 * h);
      const __m256 zc = _mm256_fmadd_ps(sv, _mm256_set1_ps(-8.f), load_bf16x8(zeros + (tile * G + g) * kTile + 8 * h));
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const __m256 sa = _mm256_mul_ps(sv, _mm256_set1_ps(a.scale[(m0 + m) * B + b]));
        total[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][h]), sa, total[m][h]);
        total[m][h] = _mm256_fmadd_ps(zc, _mm256_set1_ps(a.seg_sum[(m0 + m) * S + s]), total[m][h]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
    _mm256_storeu_ps(y + m * kTile, total[m][0]);
    _mm256_storeu_ps(y + m * kTile + 8, total[m][1]);
  }
}

// As the AVX-512 tile: per block the D of the unsigned weights, here sum(q xq) + 128 X (q = byte - 128, signed,
// times xq through |xq| and the sign of xq moved onto q).
template <int MT>
inline void int8_tile(const Activations& a, const uint8_t* w, float* y, int64_t tile, int64_t m0, int64_t K) {
  const int64_t B = K / kBlock;
  const uint8_t* t = w + tile * kTile * K;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 total[MT][2];
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) total[m][0] = total[m][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    __m256i acc[MT][2];
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int v = 0; v < 32; ++v) {
      const uint8_t* p = t + (b * 32 + v) * 64;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);
      __m256i q[2];
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        q[h] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h)), flip);
#pragma GCC unroll 4
      for (int m = 0; m < MT; ++m) {
        const __m256i xv = _mm256_set1_epi32(load_i32(a.q.data() + (m0 + m) * K + b * kBlock + 4 * v));
        const __m256i magnitude = _mm256_sign_epi8(xv, xv);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
          acc[m][h] = _mm256_add_epi32(acc[m][h], dot_lanes(magnitude, _mm256_sign_epi8(q[h], xv)));
      }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const __m256i offset = _mm256_set1_epi32(128 * a.block_sum[(m0 + m) * B + b]);
      const __m256 scale = _mm256_set1_ps(a.scale[(m0 + m) * B + b]);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h)
        total[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc[m][h], offset)), scale, total[m][h]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
    _mm256_storeu_ps(y + m * kTile, total[m][0]);
    _mm256_storeu_ps(y + m * kTile + 8, total[m][1]);
  }
}
#else
constexpr const char* kQuantPath = "portable C++";

template <int MT, int SEG_CHUNKS>
inline void int4_tile(const Activations& a, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
                      float* y, int64_t tile, int64_t m0, int64_t K, int64_t group) {
  const int64_t G = K / group, B = K / kBlock, S = K / a.seg, chunks = K / 8;
  const uint8_t* t = w + tile * kTile * (K / 2);
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < kTile; ++i) {
      float total = 0.f;
      for (int64_t c0 = 0; c0 < chunks; c0 += SEG_CHUNKS) {
        int32_t d = 0;
        for (int64_t c = c0; c < c0 + SEG_CHUNKS; ++c)
          for (int j = 0; j < 4; ++j) {
            const uint8_t byte = t[c * 64 + i * 4 + j];
            const int8_t* xp = a.q.data() + (m0 + m) * K + 8 * c;
            d += (byte & 15) * xp[j] + (byte >> 4) * xp[4 + j];
          }
        const int64_t k = 8 * c0, g = k / group;
        const float s = to_float(scales[(tile * G + g) * kTile + i]);
        const float zc = to_float(zeros[(tile * G + g) * kTile + i]) - 8.f * s;
        total += static_cast<float>(d) * (s * a.scale[(m0 + m) * B + k / kBlock]) + zc * a.seg_sum[(m0 + m) * S + k / a.seg];
      }
      y[m * kTile + i] = total;
    }
}

template <int MT>
inline void int8_tile(const Activations& a, const uint8_t* w, float* y, int64_t tile, int64_t m0, int64_t K) {
  const int64_t B = K / kBlock;
  const uint8_t* t = w + tile * kTile * K;
  for (int m = 0; m < MT; ++m)
    for (int i = 0; i < kTile; ++i) {
      float total = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        int32_t d = 0;
        for (int64_t c = 32 * b; c < 32 * (b + 1); ++c)
          for (int j = 0; j < 4; ++j) d += t[c * 64 + i * 4 + j] * a.q[(m0 + m) * K + 4 * c + j];
        total += static_cast<float>(d) * a.scale[(m0 + m) * B + b];
      }
      y[m * kTile + i] = total;
    }
}
#endif

// Every tile against every activation row, tiles split between threads; rows four at a time, so that a tile
// (at most 16 x K/2 or 16 x K bytes, in the L2 cache) is read from memory once for up to 32 rows.
template <typename Tile>
void for_row_tiles(int64_t M, int64_t N, Tile tile_fn) {
  at::parallel_for(0, N / kTile, 4, [&](int64_t begin, int64_t end) {
    float out[4 * kTile];
    for (int64_t tile = begin; tile < end; ++tile)
      for (int64_t m0 = 0; m0 < M; m0 += 4) tile_fn(tile, m0, std::min<int64_t>(4, M - m0), out);
  });
}

template <typename F>
void with_rows(int64_t count, F f) {
  switch (count) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    default: f(std::integral_constant<int, 4>()); break;
  }
}

// bfloat16 weights: every (row tile, activation tile) of the product, rows split between threads in runs of
// whole tiles: up to 3 activation rows (decode) take 4 weight rows at a time, one by one; 4 or more take 4 at
// a time.
template <typename Tile4x1, typename Tile1x4, typename Tile1x1>
void for_tiles(int64_t M, int64_t N, Tile4x1 t41, Tile1x4 t14, Tile1x1 t11) {
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n = 4 * tile;
      if (n + 4 <= N && M < 4) {
        for (int64_t m = 0; m < M; ++m) t41(n, m);
        continue;
      }
      for (int64_t r = n; r < std::min(n + 4, N); ++r) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) t14(r, m);
        for (; m < M; ++m) t11(r, m);
      }
    }
  });
}

#if PHI4FLASH_BF16_DOT
// Rows [n0, n0 + RT) of a bfloat16 weight against activation rows [m0, m0 + MT): plain dot products, one
// accumulator per (row, activation row, segment position) as in the quantized tiles.
template <int RT, int MT>
inline void bf16_tile(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t n0, int64_t m0,
                      int64_t N, int64_t K) {
  __m512 acc[RT][MT][2];
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m512bh xs[MT];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) xs[m] = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + k + 32 * h);
#pragma GCC unroll 16
      for (int r = 0; r < RT; ++r) {
        const __m512bh ws = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k + 32 * h);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) acc[r][m][h] = _mm512_dpbf16_ps(acc[r][m][h], ws, xs[m]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      float out = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t j = k; j < K; ++j) out += to_float(w[(n0 + r) * K + j]) * to_float(x[(m0 + m) * K + j]);
      y[(m0 + m) * N + n0 + r] = at::BFloat16(out);
    }
}
#elif PHI4FLASH_AVX2
// As the AVX-512 tile, with the bfloat16 products in float32 FMAs, 8 inputs at a time.
template <int RT, int MT>
inline void bf16_tile(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t n0, int64_t m0,
                      int64_t N, int64_t K) {
  __m256 acc[RT][MT][2];
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      __m256 xs[MT];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) xs[m] = load_bf16x8(x + (m0 + m) * K + k + 8 * h);
#pragma GCC unroll 16
      for (int r = 0; r < RT; ++r) {
        const __m256 ws = load_bf16x8(w + (n0 + r) * K + k + 8 * h);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) acc[r][m][h] = _mm256_fmadd_ps(ws, xs[m], acc[r][m][h]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      float out = reduce_add8(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t j = k; j < K; ++j) out += to_float(w[(n0 + r) * K + j]) * to_float(x[(m0 + m) * K + j]);
      y[(m0 + m) * N + n0 + r] = at::BFloat16(out);
    }
}
#else
template <int RT, int MT>
inline void bf16_tile(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t n0, int64_t m0,
                      int64_t N, int64_t K) {
  for (int r = 0; r < RT; ++r)
    for (int m = 0; m < MT; ++m) {
      float out = 0.f;
      for (int64_t j = 0; j < K; ++j) out += to_float(w[(n0 + r) * K + j]) * to_float(x[(m0 + m) * K + j]);
      y[(m0 + m) * N + n0 + r] = at::BFloat16(out);
    }
}
#endif

}  // namespace

static void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous (M, K) bfloat16");
  TORCH_CHECK(x.size(1) % kBlock == 0, "K must be a multiple of 128");
}

static void check_tiles(const at::Tensor& w, int64_t N, int64_t bytes_per_row) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) == N &&
                  w.size(1) == bytes_per_row && N % kTile == 0,
              "w: contiguous (N, bytes per row) uint8 in row tiles, N a multiple of 16");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_tiles(w, N, K / 2);
  TORCH_CHECK(group % 32 == 0 && K % group == 0 && (group % kBlock == 0 || kBlock % group == 0),
              "group must be 32, 64 or a multiple of 128, dividing K");
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.dim() == 3 && scales.size(0) == N / kTile &&
                  scales.size(1) == K / group && scales.size(2) == kTile && scales.scalar_type() == at::kBFloat16 &&
                  zeros.scalar_type() == at::kBFloat16 && scales.is_contiguous() && zeros.is_contiguous(),
              "scales, zeros: contiguous (N/16, K/group, 16) bfloat16");
  auto y = at::empty({M, N}, x.options());
  const int64_t seg = std::min(group, kBlock);
  const Activations a = quantize_activations(x.data_ptr<at::BFloat16>(), M, K, seg);
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  const auto* zp = zeros.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  auto run = [&](auto seg_chunks) {
    constexpr int SEG = decltype(seg_chunks)::value;
    for_row_tiles(M, N, [&](int64_t tile, int64_t m0, int64_t rows, float* out) {
      with_rows(rows, [&](auto mt) { int4_tile<decltype(mt)::value, SEG>(a, wp, sp, zp, out, tile, m0, K, group); });
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t i = 0; i < kTile; ++i) yp[(m0 + m) * N + tile * kTile + i] = at::BFloat16(out[m * kTile + i]);
    });
  };
  if (seg == 32) {
    run(std::integral_constant<int, 4>());
  } else if (seg == 64) {
    run(std::integral_constant<int, 8>());
  } else {
    run(std::integral_constant<int, 16>());
  }
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_tiles(w, N, K);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N && scales.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous(), "scales: contiguous (N,) bfloat16");
  auto y = at::empty({M, N}, x.options());
  const Activations a = quantize_activations(x.data_ptr<at::BFloat16>(), M, K, kBlock);
  std::vector<float> offset(M, 0.f);  // 128 sum(a xq) per row: the unsigned weights' offset
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / kBlock; ++b) offset[m] += 128.f * a.seg_sum[m * (K / kBlock) + b];
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  for_row_tiles(M, N, [&](int64_t tile, int64_t m0, int64_t rows, float* out) {
    with_rows(rows, [&](auto mt) { int8_tile<decltype(mt)::value>(a, wp, out, tile, m0, K); });
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t i = 0; i < kTile; ++i) {
        const int64_t n = tile * kTile + i;
        yp[(m0 + m) * N + n] = at::BFloat16(to_float(sp[n]) * (out[m * kTile + i] - offset[m0 + m]));
      }
  });
  return y;
}

// x (M, K) @ w^T for a bfloat16 weight (N, K): the matrix-vector product of decode, streaming w once.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous (M, K) bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "w: contiguous (N, K) bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  for_tiles(
      M, N, [&](int64_t n, int64_t m) { bf16_tile<4, 1>(xp, wp, yp, n, m, N, K); },
      [&](int64_t n, int64_t m) { bf16_tile<1, 4>(xp, wp, yp, n, m, N, K); },
      [&](int64_t n, int64_t m) { bf16_tile<1, 1>(xp, wp, yp, n, m, N, K); });
  return y;
}

namespace {

// One row of a quantized weight as bfloat16 (the embedding lookup's few rows).
void dequantize_row(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros, int64_t group,
                    int64_t K, int64_t n, at::BFloat16* dst) {
  const int64_t tile = n / kTile, i = n % kTile;
  if (zeros != nullptr) {
    const int64_t G = K / group;
    const uint8_t* t = w + tile * kTile * (K / 2);
    for (int64_t c = 0; c < K / 8; ++c)
      for (int j = 0; j < 4; ++j) {
        const uint8_t byte = t[c * 64 + i * 4 + j];
        for (int half = 0; half < 2; ++half) {
          const int64_t k = 8 * c + 4 * half + j, g = (tile * G + k / group) * kTile + i;
          const int q = half ? byte >> 4 : byte & 15;
          dst[k] = at::BFloat16((q - 8) * to_float(scales[g]) + to_float(zeros[g]));
        }
      }
  } else {
    const uint8_t* t = w + tile * kTile * K;
    const float s = to_float(scales[n]);
    for (int64_t c = 0; c < K / 4; ++c)
      for (int j = 0; j < 4; ++j) dst[4 * c + j] = at::BFloat16((t[c * 64 + i * 4 + j] - 128) * s);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// float -> bfloat16, rounding to nearest even (finite values)
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16));
}

inline __m512 bytes_to_float(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

// The 16 lanes (row within a tile) that output lanes take: rows r0 (lanes 0..7) and r0 + 1 (8..15) for int4,
// rows r0 .. r0 + 3 four lanes each for int8.
inline __m512i row_pairs(int r0) {
  return _mm512_set_epi32(r0 + 1, r0 + 1, r0 + 1, r0 + 1, r0 + 1, r0 + 1, r0 + 1, r0 + 1, r0, r0, r0, r0, r0, r0, r0, r0);
}
inline __m512i row_quads(int r0) {
  return _mm512_set_epi32(r0 + 3, r0 + 3, r0 + 3, r0 + 3, r0 + 2, r0 + 2, r0 + 2, r0 + 2, r0 + 1, r0 + 1, r0 + 1, r0 + 1,
                          r0, r0, r0, r0);
}

// A whole tile (16 rows) of int4, vectorized: each 64-byte chunk gives 8 inputs of every row.
void dequantize_tile_int4(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros, int64_t group,
                          int64_t K, int64_t tile, at::BFloat16* out) {
  const int64_t G = K / group;
  const uint8_t* t = w + tile * kTile * (K / 2);
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const __m512 sv = load_bf16x16(scales + (tile * G + g) * kTile);
    const __m512 zc = _mm512_fmadd_ps(sv, _mm512_set1_ps(-8.f), load_bf16x16(zeros + (tile * G + g) * kTile));
    for (int64_t c = g * group / 8; c < (g + 1) * group / 8; ++c) {
      const __m512i wv = _mm512_loadu_si512(t + c * 64);
      const __m512i lo = _mm512_and_si512(wv, mask), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask);
      const __m512i pairs[2] = {_mm512_unpacklo_epi32(lo, hi), _mm512_unpackhi_epi32(lo, hi)};
#pragma GCC unroll 2
      for (int p = 0; p < 2; ++p)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          __m128i bytes;
          switch (q) {  // the lane index must be a constant
            case 0: bytes = _mm512_extracti32x4_epi32(pairs[p], 0); break;
            case 1: bytes = _mm512_extracti32x4_epi32(pairs[p], 1); break;
            case 2: bytes = _mm512_extracti32x4_epi32(pairs[p], 2); break;
            default: bytes = _mm512_extracti32x4_epi32(pairs[p], 3); break;
          }
          const int r0 = 4 * q + 2 * p;
          const __m512i idx = row_pairs(r0);
          const __m256i v = to_bf16(_mm512_fmadd_ps(bytes_to_float(bytes), _mm512_permutexvar_ps(idx, sv),
                                                    _mm512_permutexvar_ps(idx, zc)));
          at::BFloat16* row = out + (tile * kTile + r0) * K + 8 * c;
          _mm_storeu_si128(reinterpret_cast<__m128i*>(row), _mm256_castsi256_si128(v));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(row + K), _mm256_extracti128_si256(v, 1));
        }
    }
  }
}

// A whole tile of int8, vectorized: each 64-byte chunk gives 4 inputs of every row.
void dequantize_tile_int8(const uint8_t* w, const at::BFloat16* scales, int64_t K, int64_t tile, at::BFloat16* out) {
  const uint8_t* t = w + tile * kTile * K;
  const __m512 sv = load_bf16x16(scales + tile * kTile);
  for (int64_t c = 0; c < K / 4; ++c) {
    const __m512i wv = _mm512_loadu_si512(t + c * 64);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m128i bytes;
      switch (q) {
        case 0: bytes = _mm512_extracti32x4_epi32(wv, 0); break;
        case 1: bytes = _mm512_extracti32x4_epi32(wv, 1); break;
        case 2: bytes = _mm512_extracti32x4_epi32(wv, 2); break;
        default: bytes = _mm512_extracti32x4_epi32(wv, 3); break;
      }
      const __m512 s = _mm512_permutexvar_ps(row_quads(4 * q), sv);
      const __m256i v = to_bf16(_mm512_mul_ps(_mm512_sub_ps(bytes_to_float(bytes), _mm512_set1_ps(128.f)), s));
      at::BFloat16* row = out + (tile * kTile + 4 * q) * K + 4 * c;
      const __m128i low = _mm256_castsi256_si128(v), high = _mm256_extracti128_si256(v, 1);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(row), low);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(row + K), _mm_unpackhi_epi64(low, low));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(row + 2 * K), high);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(row + 3 * K), _mm_unpackhi_epi64(high, high));
    }
  }
}
#define PHI4FLASH_VECTOR_DEQUANT 1
#elif PHI4FLASH_AVX2
// The AVX-512 dequantize_tile_int4 on 8 lanes: row i's 4 bytes of a 64-byte chunk are its 8 inputs 8c .. 8c + 7
// (low nibbles first).
void dequantize_tile_int4(const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros, int64_t group,
                          int64_t K, int64_t tile, at::BFloat16* out) {
  const int64_t G = K / group;
  const uint8_t* t = w + tile * kTile * (K / 2);
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    __m256 sv[kTile], zc[kTile];
    for (int i = 0; i < kTile; ++i) {
      const float scale = to_float(scales[(tile * G + g) * kTile + i]);
      sv[i] = _mm256_set1_ps(scale);
      zc[i] = _mm256_set1_ps(to_float(zeros[(tile * G + g) * kTile + i]) - 8.f * scale);
    }
    for (int64_t c = g * group / 8; c < (g + 1) * group / 8; ++c)
#pragma GCC unroll 4
      for (int i = 0; i < kTile; ++i) {
        const __m128i word = _mm_cvtsi32_si128(load_i32(reinterpret_cast<const int8_t*>(t + c * 64 + i * 4)));
        const __m128i nibbles = _mm_unpacklo_epi32(_mm_and_si128(word, mask),
                                                   _mm_and_si128(_mm_srli_epi16(word, 4), mask));
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles));
        store_bf16x8(out + (tile * kTile + i) * K + 8 * c, _mm256_fmadd_ps(q, sv[i], zc[i]));
      }
  }
}

// The same for int8: row i's 4 bytes of chunks c and c + 1 are its inputs 4c .. 4c + 7.
void dequantize_tile_int8(const uint8_t* w, const at::BFloat16* scales, int64_t K, int64_t tile, at::BFloat16* out) {
  const uint8_t* t = w + tile * kTile * K;
  for (int i = 0; i < kTile; ++i) {
    const __m256 s = _mm256_set1_ps(to_float(scales[tile * kTile + i]));
    at::BFloat16* row = out + (tile * kTile + i) * K;
    for (int64_t c = 0; c < K / 4; c += 2) {
      const __m128i bytes = _mm_unpacklo_epi32(
          _mm_cvtsi32_si128(load_i32(reinterpret_cast<const int8_t*>(t + c * 64 + i * 4))),
          _mm_cvtsi32_si128(load_i32(reinterpret_cast<const int8_t*>(t + (c + 1) * 64 + i * 4))));
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      store_bf16x8(row + 4 * c, _mm256_mul_ps(_mm256_sub_ps(q, _mm256_set1_ps(128.f)), s));
    }
  }
}
#define PHI4FLASH_VECTOR_DEQUANT 1
#endif

}  // namespace

static void check_layer(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                        int64_t group) {
  const bool int4 = zeros.has_value();
  const int64_t N = w.size(0), K = int4 ? w.size(1) * 2 : w.size(1);
  check_tiles(w, N, w.size(1));
  TORCH_CHECK(K % kBlock == 0 && (!int4 || (group % 32 == 0 && K % group == 0)), "bad K or group");
  TORCH_CHECK(scales.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  (!int4 || (zeros->is_contiguous() && zeros->scalar_type() == at::kBFloat16 &&
                             scales.numel() == N * (K / group) && zeros->numel() == scales.numel())) &&
                  (int4 || scales.numel() == N),
              "scales (and zeros): contiguous bfloat16 of the layer's size");
}

// Tiles [first, first + count) into ``out`` (row n of the weight at out + n K), or, where ``out_f32`` is given,
// into it as float32 (each value still rounded to bfloat16 first, as the bfloat16 path sees it): a tile at a
// time through a buffer that stays in cache, so that a product in float32 needs no second pass over the weight.
static void dequantize_tiles(const uint8_t* wp, const at::BFloat16* sp, const at::BFloat16* zp, int64_t group,
                             int64_t K, int64_t first, int64_t count, at::BFloat16* out, float* out_f32 = nullptr) {
  at::parallel_for(first, first + count, 1, [&](int64_t begin, int64_t end) {
    std::vector<at::BFloat16> buffer(out_f32 != nullptr ? kTile * K : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      // the tile functions write rows tile * 16 .. relative to their base: shift the buffer's to match
      at::BFloat16* dst = out_f32 != nullptr ? buffer.data() - tile * kTile * K : out;
#if PHI4FLASH_VECTOR_DEQUANT
      if (zp != nullptr) {
        dequantize_tile_int4(wp, sp, zp, group, K, tile, dst);
      } else {
        dequantize_tile_int8(wp, sp, K, tile, dst);
      }
#else
      for (int64_t n = tile * kTile; n < (tile + 1) * kTile; ++n) dequantize_row(wp, sp, zp, group, K, n, dst + n * K);
#endif
      if (out_f32 != nullptr) {
        float* rows = out_f32 + tile * kTile * K;
        for (int64_t i = 0; i < kTile * K; ++i) rows[i] = static_cast<float>(buffer[i]);
      }
    }
  });
}

// Rows of a quantized weight as bfloat16, (R, K); ``rows`` selects them (all when None). ``zeros`` is
// defined for int4 (scales and zeros in tiles), undefined for int8 (scales per row).
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                      int64_t group, const c10::optional<at::Tensor>& rows) {
  check_layer(w, scales, zeros, group);
  const bool int4 = zeros.has_value();
  const int64_t N = w.size(0), K = int4 ? w.size(1) * 2 : w.size(1);
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  const at::BFloat16* zp = int4 ? zeros->data_ptr<at::BFloat16>() : nullptr;
  if (rows.has_value()) {
    const at::Tensor index = rows->to(at::kLong).contiguous();
    const int64_t R = index.numel();
    const auto* ip = index.data_ptr<int64_t>();
    for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < N, "row index out of range");
    auto out = at::empty({R, K}, w.options().dtype(at::kBFloat16));
    auto* op = out.data_ptr<at::BFloat16>();
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dequantize_row(wp, sp, zp, group, K, ip[r], op + r * K);
    });
    return out;
  }
  auto out = at::empty({N, K}, w.options().dtype(at::kBFloat16));
  dequantize_tiles(wp, sp, zp, group, K, 0, N / kTile, out.data_ptr<at::BFloat16>());
  return out;
}

// Rows [first_row, first_row + out.size(0)) of the weight into ``out``, bfloat16 or float32 (a reused buffer: a
// prefill dequantizes every weight once per chunk, and fresh memory would cost a page fault per 4 KB).
void dequantize_into(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                     int64_t group, int64_t first_row, at::Tensor out) {
  const bool int4 = zeros.has_value();
  const int64_t N = w.size(0), K = int4 ? w.size(1) * 2 : w.size(1), R = out.size(0);
  check_layer(w, scales, zeros, group);
  const bool f32 = out.scalar_type() == at::kFloat;
  TORCH_CHECK(out.dim() == 2 && out.size(1) == K && (f32 || out.scalar_type() == at::kBFloat16) &&
                  out.is_contiguous() && first_row % kTile == 0 && R % kTile == 0 && first_row >= 0 &&
                  first_row + R <= N,
              "out: contiguous (R, K) bfloat16 or float32, rows first_row .. first_row + R in whole tiles of the "
              "weight");
  const at::BFloat16* zp = int4 ? zeros->data_ptr<at::BFloat16>() : nullptr;
  // the tiles are written relative to ``out``: shift the base so that tile first_row / 16 lands at row 0
  if (f32) {
    dequantize_tiles(w.data_ptr<uint8_t>(), scales.data_ptr<at::BFloat16>(), zp, group, K, first_row / kTile,
                     R / kTile, nullptr, out.data_ptr<float>() - first_row * K);
  } else {
    dequantize_tiles(w.data_ptr<uint8_t>(), scales.data_ptr<at::BFloat16>(), zp, group, K, first_row / kTile,
                     R / kTile, out.data_ptr<at::BFloat16>() - first_row * K);
  }
}

std::string isa() { return std::string(kQuantPath) + (PHI4FLASH_BF16_DOT_ON ? " + avx512-bf16" : ""); }

}  // namespace phi4flash
