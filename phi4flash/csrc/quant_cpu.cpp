// phi4flash's CPU kernels for weight-only quantized linears: matrix-vector products for decode that stream
// the packed weights once, and dequantization to bfloat16 (all rows for prefill's dense matmul, or a few
// rows for the embedding lookup).
//
// Layout ("nibble planes", built by phi4flash/qkernels.py): a weight row is cut into blocks of 128 inputs.
// A plane of one block is 64 bytes, read as 32 little-endian 16-bit lanes; lane i holds four nibbles, the
// nibble at bits 4t..4t+3 being input 32 t + i of the block.
//   int4: one plane per block, nibble q in [0, 15]; scales, zeros (N, K/g) bfloat16; weight = (q - 8) s + z.
//   int8: two planes per block (low then high nibbles of u = q + 128); scales (N,) bfloat16; weight = q s.
// Activations x (M, K) bfloat16; outputs (M, N) bfloat16, accumulated in float32.
//
// The products use AVX512-BF16 dot products on exact bfloat16 images of the nibbles: 0x4300 | n is the
// bfloat16 of 128 + n, so D = sum((128 + n) x) = sum(n x) + 128 X with X = sum(x):
//   int4, per group:  sum(w x) = s D + (z - 136 s) X
//   int8, per row:    sum(w x) = s (16 D_high + D_low - 2304 X)   (16 D_high as D_high against 16 x)
// Every product is exact in float32. Without AVX512-BF16 the same arithmetic runs as plain C++ loops.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define PHI4FLASH_BF16_DOT 1
#endif

namespace {

constexpr int64_t kBlock = 128;       // inputs per block
constexpr int64_t kPlaneBytes = 64;   // bytes per plane of one block

inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

// Nibble of input k (0 <= k < 128) within one plane of a block.
inline int plane_nibble(const uint8_t* plane, int64_t k) {
  const int64_t t = k / 32, i = k % 32;
  const uint16_t lane = static_cast<uint16_t>(plane[2 * i] | (plane[2 * i + 1] << 8));
  return (lane >> (4 * t)) & 0xF;
}

// Sums of x over consecutive runs of ``width`` inputs: (M, K / width) floats.
std::vector<float> run_sums(const at::BFloat16* x, int64_t M, int64_t K, int64_t width) {
  const int64_t R = K / width;
  std::vector<float> sums(M * R, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) sums[m * R + k / width] += to_float(x[m * K + k]);
  return sums;
}

#if PHI4FLASH_BF16_DOT
constexpr const char* kPath = "avx512-bf16";

// The bfloat16 images (128 + nibble) of segment t of a plane: 32 inputs 32 t .. 32 t + 31, in order.
inline __m512bh segment(__m512i plane, int t) {
  const __m512i nib = _mm512_and_si512(_mm512_srli_epi16(plane, 4 * t), _mm512_set1_epi16(0x000F));
  return (__m512bh)_mm512_or_si512(nib, _mm512_set1_epi16(0x4300));
}

// Rows [n0, n0 + RT) against activation rows [m0, m0 + MT), int4, for groups of SEG segments of 32 inputs
// (SEG 4: groups of whole blocks). Each (row, activation row) keeps one accumulator per segment position t,
// so that 4 RT MT dot products are independent; every index is a compile-time constant once the loops
// unroll, so the accumulators live in registers.
template <int RT, int MT, int SEG>
inline void int4_tile(const at::BFloat16* x, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
                      const float* xsum, at::BFloat16* y, int64_t n0, int64_t m0, int64_t N, int64_t K, int64_t group) {
  const int64_t G = K / group, row_bytes = K / 2, blocks_per_group = SEG == 4 ? group / kBlock : 1;
  __m512 acc[RT][MT][4], total[RT][MT];
  float extra[RT][MT];
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      total[r][m] = _mm512_setzero_ps();
      extra[r][m] = 0.f;
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) acc[r][m][t] = _mm512_setzero_ps();
    }
  // scale the accumulators of segments [first, last] (one group) into the totals
  auto close_group = [&](int first, int last, int64_t g) __attribute__((always_inline)) {
#pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) {
      const float s = to_float(scales[(n0 + r) * G + g]);
      const float zc = to_float(zeros[(n0 + r) * G + g]) - 136.f * s;
      const __m512 sv = _mm512_set1_ps(s);
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        __m512 sum = acc[r][m][first];
        acc[r][m][first] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int u = first + 1; u <= last; ++u) {
          sum = _mm512_add_ps(sum, acc[r][m][u]);
          acc[r][m][u] = _mm512_setzero_ps();
        }
        total[r][m] = _mm512_fmadd_ps(sum, sv, total[r][m]);
        extra[r][m] += zc * xsum[(m0 + m) * G + g];
      }
    }
  };
  int64_t block_count = 0;
  for (int64_t kb = 0; kb < K; kb += kBlock) {
    __m512i planes[RT];
#pragma GCC unroll 16
    for (int r = 0; r < RT; ++r)
      planes[r] = _mm512_loadu_si512(w + (n0 + r) * row_bytes + (kb / kBlock) * kPlaneBytes);
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      __m512bh xs[MT];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) xs[m] = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + kb + 32 * t);
#pragma GCC unroll 16
      for (int r = 0; r < RT; ++r) {
        const __m512bh ws = segment(planes[r], t);
#pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) acc[r][m][t] = _mm512_dpbf16_ps(acc[r][m][t], ws, xs[m]);
      }
      if (SEG < 4 && t % SEG == SEG - 1) close_group(t + 1 - SEG, t, (kb + 32 * t) / group);
    }
    if (SEG == 4 && ++block_count == blocks_per_group) {
      block_count = 0;
      close_group(0, 3, kb / group);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
      y[(m0 + m) * N + n0 + r] = at::BFloat16(_mm512_reduce_add_ps(total[r][m]) + extra[r][m]);
}

// Rows [n0, n0 + RT) against activation rows [m0, m0 + MT), int8: the high plane is dotted with x16 = 16 x
// (exact in bfloat16), so both planes add into the same accumulators: D = 16 D_high + D_low.
template <int RT, int MT>
inline void int8_tile(const at::BFloat16* x, const at::BFloat16* x16, const uint8_t* w, const at::BFloat16* scales,
                      const float* xsum, at::BFloat16* y, int64_t n0, int64_t m0, int64_t N, int64_t K) {
  const int64_t row_bytes = K;
  __m512 acc[RT][MT][4];
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) acc[r][m][t] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < K; kb += kBlock) {
    __m512i lo[RT], hi[RT];
#pragma GCC unroll 16
    for (int r = 0; r < RT; ++r) {
      const uint8_t* base = w + (n0 + r) * row_bytes + (kb / kBlock) * 2 * kPlaneBytes;
      lo[r] = _mm512_loadu_si512(base);
      hi[r] = _mm512_loadu_si512(base + kPlaneBytes);
    }
#pragma GCC unroll 4
    for (int t = 0; t < 4; ++t) {
      __m512bh xs[MT], xs16[MT];
#pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        xs[m] = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + kb + 32 * t);
        xs16[m] = (__m512bh)_mm512_loadu_si512(x16 + (m0 + m) * K + kb + 32 * t);
      }
#pragma GCC unroll 16
      for (int r = 0; r < RT; ++r) {
        const __m512bh wl = segment(lo[r], t), wh = segment(hi[r], t);
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
          acc[r][m][t] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][m][t], wl, xs[m]), wh, xs16[m]);
      }
    }
  }
  for (int r = 0; r < RT; ++r) {
    const float s = to_float(scales[n0 + r]);
    for (int m = 0; m < MT; ++m) {
      const __m512 d = _mm512_add_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]),
                                     _mm512_add_ps(acc[r][m][2], acc[r][m][3]));
      y[(m0 + m) * N + n0 + r] = at::BFloat16(s * (_mm512_reduce_add_ps(d) - 2304.f * xsum[m0 + m]));
    }
  }
}

#else
constexpr const char* kPath = "portable C++";

template <int RT, int MT, int SEG>
inline void int4_tile(const at::BFloat16* x, const uint8_t* w, const at::BFloat16* scales, const at::BFloat16* zeros,
                      const float* xsum, at::BFloat16* y, int64_t n0, int64_t m0, int64_t N, int64_t K, int64_t group) {
  const int64_t G = K / group;
  for (int r = 0; r < RT; ++r) {
    const uint8_t* row = w + (n0 + r) * (K / 2);
    for (int m = 0; m < MT; ++m) {
      float total = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        float d = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k)
          d += (128.f + plane_nibble(row + (k / kBlock) * kPlaneBytes, k % kBlock)) * to_float(x[(m0 + m) * K + k]);
        const float s = to_float(scales[(n0 + r) * G + g]);
        total += s * d + (to_float(zeros[(n0 + r) * G + g]) - 136.f * s) * xsum[(m0 + m) * G + g];
      }
      y[(m0 + m) * N + n0 + r] = at::BFloat16(total);
    }
  }
}

template <int RT, int MT>
inline void int8_tile(const at::BFloat16* x, const at::BFloat16* x16, const uint8_t* w, const at::BFloat16* scales,
                      const float* xsum, at::BFloat16* y, int64_t n0, int64_t m0, int64_t N, int64_t K) {
  (void)xsum;
  (void)x16;
  for (int r = 0; r < RT; ++r) {
    const uint8_t* row = w + (n0 + r) * K;
    for (int m = 0; m < MT; ++m) {
      float total = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* block = row + (k / kBlock) * 2 * kPlaneBytes;
        const int u = plane_nibble(block, k % kBlock) | (plane_nibble(block + kPlaneBytes, k % kBlock) << 4);
        total += (u - 128) * to_float(x[(m0 + m) * K + k]);
      }
      y[(m0 + m) * N + n0 + r] = at::BFloat16(total * to_float(scales[n0 + r]));
    }
  }
}
#endif

// Every (row tile, activation tile) of the product, rows split between threads in runs of whole tiles:
// up to 3 activation rows (decode) take 4 weight rows at a time, one by one; 4 or more take 4 at a time.
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

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous (M, K) bfloat16");
  TORCH_CHECK(x.size(1) % kBlock == 0, "K must be a multiple of 128");
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 2 == K,
              "w: contiguous (N, K/2) uint8 in nibble planes");
  TORCH_CHECK((group == 32 || group == 64 || group % kBlock == 0) && K % group == 0,
              "group must be 32, 64 or a multiple of 128, dividing K");
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.size(0) == N && scales.size(1) == K / group &&
                  scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous() && zeros.is_contiguous(),
              "scales, zeros: contiguous (N, K/group) bfloat16");
  auto y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  const auto* zp = zeros.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const std::vector<float> xsum = run_sums(xp, M, K, group);
  const float* xs = xsum.data();
  auto run = [&](auto seg) {
    constexpr int SEG = decltype(seg)::value;
    for_tiles(
        M, N, [&](int64_t n, int64_t m) { int4_tile<4, 1, SEG>(xp, wp, sp, zp, xs, yp, n, m, N, K, group); },
        [&](int64_t n, int64_t m) { int4_tile<1, 4, SEG>(xp, wp, sp, zp, xs, yp, n, m, N, K, group); },
        [&](int64_t n, int64_t m) { int4_tile<1, 1, SEG>(xp, wp, sp, zp, xs, yp, n, m, N, K, group); });
  };
  if (group == 32) {
    run(std::integral_constant<int, 1>());
  } else if (group == 64) {
    run(std::integral_constant<int, 2>());
  } else {
    run(std::integral_constant<int, 4>());
  }
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  check_x(x);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) == K,
              "w: contiguous (N, K) uint8 in nibble planes");
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == N && scales.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous(), "scales: contiguous (N,) bfloat16");
  auto y = at::empty({M, N}, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<uint8_t>();
  const auto* sp = scales.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const std::vector<float> xsum = run_sums(xp, M, K, K);
  const float* xs = xsum.data();
  const at::Tensor x16_t = x * 16;  // exact in bfloat16: a power of two
  const auto* x16 = x16_t.data_ptr<at::BFloat16>();
  for_tiles(
      M, N, [&](int64_t n, int64_t m) { int8_tile<4, 1>(xp, x16, wp, sp, xs, yp, n, m, N, K); },
      [&](int64_t n, int64_t m) { int8_tile<1, 4>(xp, x16, wp, sp, xs, yp, n, m, N, K); },
      [&](int64_t n, int64_t m) { int8_tile<1, 1>(xp, x16, wp, sp, xs, yp, n, m, N, K); });
  return y;
}

// Rows of a quantized weight as bfloat16, (R, K); ``rows`` selects them (all when None). ``zeros`` is
// defined for int4 (one plane per block), undefined for int8 (two planes).
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                      int64_t group, const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "w: contiguous uint8 planes");
  const bool int4 = zeros.has_value();
  const int64_t N = w.size(0), K = int4 ? w.size(1) * 2 : w.size(1), G = int4 ? K / group : 1;
  TORCH_CHECK(K % kBlock == 0 && (!int4 || (group % 32 == 0 && K % group == 0)), "bad K or group");
  const at::Tensor index = rows.has_value() ? rows->to(at::kLong).contiguous()
                                            : at::arange(N, w.options().dtype(at::kLong));
  const int64_t R = index.numel();
  auto out = at::empty({R, K}, w.options().dtype(at::kBFloat16));
  const auto* ip = index.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < N, "row index out of range");
  const auto* wp = w.data_ptr<uint8_t>();
  const at::Tensor s_c = scales.contiguous();
  const auto* sp = s_c.data_ptr<at::BFloat16>();
  const at::Tensor z_c = int4 ? zeros->contiguous() : at::Tensor();
  const at::BFloat16* zp = int4 ? z_c.data_ptr<at::BFloat16>() : nullptr;
  auto* op = out.data_ptr<at::BFloat16>();
  const int64_t row_bytes = w.size(1), block_bytes = int4 ? kPlaneBytes : 2 * kPlaneBytes;
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = ip[r];
      const uint8_t* row = wp + n * row_bytes;
      at::BFloat16* dst = op + r * K;
      for (int64_t kb = 0; kb < K; kb += kBlock) {
        const uint8_t* block = row + (kb / kBlock) * block_bytes;
#if PHI4FLASH_BF16_DOT
        const __m512i lo = _mm512_loadu_si512(block);
        const __m512i hi = int4 ? _mm512_setzero_si512() : _mm512_loadu_si512(block + kPlaneBytes);
        for (int t = 0; t < 4; ++t) {
          const int64_t k = kb + 32 * t;
          const __m512i mask = _mm512_set1_epi16(0x000F);
          __m512i q = _mm512_and_si512(_mm512_srli_epi16(lo, 4 * t), mask);  // 32 lanes of 16 bits
          float s, zc;
          if (int4) {
            s = to_float(sp[n * G + k / group]);
            zc = to_float(zp[n * G + k / group]) - 8.f * s;
          } else {  // u = 16 high + low; weight = (u - 128) s
            q = _mm512_or_si512(q, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hi, 4 * t), mask), 4));
            s = to_float(sp[n]);
            zc = -128.f * s;
          }
          const __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(zc);
          for (int half = 0; half < 2; ++half) {
            const __m256i q16 = half ? _mm512_extracti64x4_epi64(q, 1) : _mm512_castsi512_si256(q);
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(q16)), sv, zv);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + k + 16 * half), (__m256i)_mm512_cvtneps_pbh(v));
          }
        }
#else
        for (int64_t j = 0; j < kBlock; ++j) {
          const int64_t k = kb + j;
          if (int4) {
            const float s = to_float(sp[n * G + k / group]);
            dst[k] = at::BFloat16((plane_nibble(block, j) - 8) * s + to_float(zp[n * G + k / group]));
          } else {
            const int u = plane_nibble(block, j) | (plane_nibble(block + kPlaneBytes, j) << 4);
            dst[k] = at::BFloat16((u - 128) * to_float(sp[n]));
          }
        }
#endif
      }
    }
  });
  return out;
}

std::string isa() { return kPath; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &int4_linear, "x (M, K) bf16 @ int4 weight^T -> (M, N) bf16");
  m.def("int8_linear", &int8_linear, "x (M, K) bf16 @ int8 weight^T -> (M, N) bf16");
  m.def("dequantize", &dequantize, "weight rows -> (R, K) bf16", py::arg("w"), py::arg("scales"),
        py::arg("zeros") = py::none(), py::arg("group") = 0, py::arg("rows") = py::none());
  m.def("isa", &isa, "the instruction set the kernels were built for");
}
