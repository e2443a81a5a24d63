// Differential attention for one new token per row (decode) on the CPU, reading the K/V cache where it lies.
//
// The cache keeps keys and values as (B, S, Hkv, Dh): one position's keys (or values) are Hkv Dh contiguous
// values, and kv heads 2p and 2p+1 (pair p) sit side by side. Query head h belongs to group h % 2 and
// pair-index j = h / 2, and uses kv pair p = j / g (g = H / Hkv): its keys are kv head 2p + h % 2, its values
// the whole pair [V_2p || V_2p+1] (2 Dh).
//
// As flash-decoding does, the positions are cut into blocks, and one job is one (row, block): every query head
// scores the block's keys, takes the block's softmax in float32 and sums the block's values; the blocks'
// maxima, sums and partial outputs are then combined. A job walks its positions in order, reading each
// position's keys and values whole, so the cache streams from memory sequentially (a job per kv pair read
// 256 bytes out of every 2560 of the real model's cache, at a third of the speed), and nothing is copied
// (PyTorch's batched matmul copies the strided cache before it multiplies).
//
// The scores and the value sums run in vector registers with AVX-512 (16 lanes) or AVX2 (8 lanes: four heads by 16
// outputs, over runs of 16 positions so that a run's values are read from L1), in plain loops otherwise. A short
// cache is cut into one block per thread.
//
// diff_attention_decode's output (B, 2, H / 2, 2 Dh): [group][pair-index], what both head groups' attention gives
// before the differential combination; diff_attention_step's (B, H Dh): the combination done too (O1 - lambda O2,
// the RMS norm, the gain, the scaling), which costs a dozen small PyTorch operations per layer otherwise.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace phi4flash {
namespace {

template <typename T>
inline void load_floats(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PHI4FLASH_AVX512_ATTENTION 1
// the first n (at most 16) lanes; loads under a mask read nothing past them, so any head width takes the
// vector path (the embedded model's is 44)
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) { return load_bf16x16(p, m); }

// lane 4 i of the result = the sum of a_i's lanes (i = 0..3): four horizontal sums for the price of one
inline __m512 sum_each(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_f32x4(t01, t23, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
}
#endif

#if !defined(PHI4FLASH_AVX512_ATTENTION) && defined(PHI4FLASH_SIMD_AVX2)
#define PHI4FLASH_AVX2_ATTENTION 1
// lanes [0, n) of 8 (n < 8: a masked load, nothing past them is read; for bfloat16 n is even, the mask is on
// pairs of values, since AVX2 masks 32-bit lanes at the finest)
inline __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes8(n));
}
inline __m256 load8(const at::BFloat16* p, int64_t n) {
  if (n >= 8) return load_bf16x8(p);
  return bf16x8_to_floats(
      _mm_maskload_epi32(reinterpret_cast<const int*>(p), _mm256_castsi256_si128(first_lanes8(n / 2))));
}
inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, first_lanes8(n), v);
}
#endif

#if defined(PHI4FLASH_AVX512_ATTENTION) || defined(PHI4FLASH_AVX2_ATTENTION)
// a position's values (count of them), into L2 while its keys are scored: the value pass then reads them per kv
// pair from there, with its sums in registers
template <typename T>
inline void prefetch_values(const T* row, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < count * static_cast<int64_t>(sizeof(T)); byte += 64)
    _mm_prefetch(bytes + byte, _MM_HINT_T1);
}
#endif

// a . b in 16 independent lanes (so that the compiler vectorises without reassociating), then their sum
inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lanes[l] += a[i + l] * b[i + l];
  float total = 0.f;
  for (; i < n; ++i) total += a[i] * b[i];
  for (int l = 0; l < 16; ++l) total += lanes[l];
  return total;
}

// p[s] = exp(p[s] - max) over the valid keys (p[s] = -inf marks an invalid one, which gets 0); returns the sum
inline float exp_shifted(float* p, int64_t S, float max) {
  int64_t s = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  __m512 total = _mm512_setzero_ps();
  const __m512 shift = _mm512_set1_ps(max);
  for (; s + 16 <= S; s += 16) {
    const __m512 x = _mm512_loadu_ps(p + s);
    const __mmask16 valid = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                               _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(x, shift)));
    _mm512_storeu_ps(p + s, e);
    total = _mm512_add_ps(total, e);
  }
  sum = _mm512_reduce_add_ps(total);
#elif defined(PHI4FLASH_SIMD_AVX2)
  __m256 total = _mm256_setzero_ps();
  const __m256 shift = _mm256_set1_ps(max);
  for (; s + 8 <= S; s += 8) {
    const __m256 x = _mm256_loadu_ps(p + s);
    const __m256 valid = _mm256_cmp_ps(x, _mm256_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
    const __m256 e = _mm256_and_ps(valid, exp_nonpositive(_mm256_sub_ps(x, shift)));
    _mm256_storeu_ps(p + s, e);
    total = _mm256_add_ps(total, e);
  }
  sum = reduce_add8(total);
#endif
  for (; s < S; ++s) {
    p[s] = std::isinf(p[s]) ? 0.f : std::exp(p[s] - max);
    sum += p[s];
  }
  return sum;
}

constexpr int64_t kPositions = 256;    // positions per job, at most
constexpr int64_t kMinPositions = 32;  // and at least, where the cache is short

// A short cache is cut into as many blocks as there are threads, so that a one-row decode does not leave a core
// idle (100 positions used to be one job); a long one into blocks of 256.
inline int64_t job_positions(int64_t S) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::min(kPositions, std::max(kMinPositions, (S + threads - 1) / threads));
}

// the kv head whose keys query head h scores
inline int64_t key_head(int64_t h, int64_t g) { return 2 * ((h / 2) / g) + h % 2; }

#if defined(PHI4FLASH_AVX2_ATTENTION)
// The scaled scores of one position's keys for every query head, 4 heads at a time: scores[h * len] for query
// head h (queries (H4, Dh), zero rows past H).
template <typename T>
inline void score_position(const float* queries, const T* key, float* scores, int64_t len, int64_t H, int64_t H4,
                           int64_t Dh, int64_t g) {
  const int64_t whole = Dh / 8 * 8;
  alignas(16) float lanes[4];
  for (int64_t h0 = 0; h0 < H4; h0 += 4) {
    const T* kh[4];
    const float* qh[4];
    __m256 sum[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      kh[i] = key + key_head(std::min(h0 + i, H - 1), g) * Dh;  // a padding row reads real keys
      qh[i] = queries + (h0 + i) * Dh;
      sum[i] = _mm256_setzero_ps();
    }
    int64_t d = 0;
    for (; d < whole; d += 8) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) sum[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qh[i] + d), load8(kh[i] + d, 8), sum[i]);
    }
    if (d < Dh) {
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
        sum[i] = _mm256_fmadd_ps(load8(qh[i] + d, Dh - d), load8(kh[i] + d, Dh - d), sum[i]);
    }
    _mm_store_ps(lanes, sum_each4(sum));
    for (int i = 0; i < 4; ++i) scores[(h0 + i) * len] = lanes[i];
  }
}

// out[i][0, 16) += sum over positions [s0, s1) of w[i][s] v[s][0, 16), for four heads i; with kWhole false only
// the first ``live`` (< 16) outputs. The 8 sums stay in registers (all AVX2 has room for, with the two value
// vectors and a weight); a padding head has a zero weight row and writes to a scratch row.
template <typename T, bool kWhole>
inline void add_values(const T* v, int64_t v_stride, const bool* valid, int64_t s0, int64_t s1, const float* const* w,
                       float* const* out, int64_t live) {
  const int64_t live0 = kWhole ? 8 : live, live1 = kWhole ? 8 : live - 8;
  const __m256 zero = _mm256_setzero_ps();
  __m256 sum[4][2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    sum[i][0] = load8(out[i], live0);
    sum[i][1] = live1 > 0 ? load8(out[i] + 8, live1) : zero;
  }
  for (int64_t s = s0; s < s1; ++s) {
    if (valid && !valid[s]) continue;
    const T* vp = v + s * v_stride;
    const __m256 x0 = load8(vp, live0);
    const __m256 x1 = live1 > 0 ? load8(vp + 8, live1) : zero;
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const __m256 weight = _mm256_broadcast_ss(w[i] + s);
      sum[i][0] = _mm256_fmadd_ps(weight, x0, sum[i][0]);
      sum[i][1] = _mm256_fmadd_ps(weight, x1, sum[i][1]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    store8(out[i], sum[i][0], live0);
    if (live1 > 0) store8(out[i] + 8, sum[i][1], live1);
  }
}
#endif

// One (row, block) job: queries (H4, Dh) float, scaled, H4 = H rounded up to 4 (zero rows past H); raw_queries
// the same unscaled in bfloat16 when the cache is bfloat16 (for AVX512-BF16's dot products), else null; k, v
// at the block's first position, positions ``stride`` elements apart; valid: (len,) or null. Writes the
// block's maximum score and sum of exp per head (H,) and its unnormalised output per head (H, 2 Dh).
template <typename T>
void attend_block(const float* queries, const at::BFloat16* raw_queries, float scale, const T* k, const T* v,
                  int64_t k_stride, int64_t v_stride, const bool* valid, int64_t len, int64_t H, int64_t Dh,
                  int64_t g, float* block_max, float* block_sum, float* acc, std::vector<float>& scratch) {
  const int64_t H4 = (H + 3) / 4 * 4, width = 2 * Dh, pairs = H / (2 * g);
  scratch.resize(H4 * len + width + len + 16);
  float* scores = scratch.data();   // (H4, len)
  float* buf = scores + H4 * len;   // (2 Dh): one pair's keys or values in float; then room for the AVX2 path
  const float none = -std::numeric_limits<float>::infinity();
#if defined(PHI4FLASH_AVX2_ATTENTION)
  const bool vector_path = std::is_same<T, float>::value || Dh % 2 == 0;  // bfloat16 tails load pairs of values
#endif
  for (int64_t s = 0; s < len; ++s) {
    if (valid && !valid[s]) {
      for (int64_t h = 0; h < H4; ++h) scores[h * len + s] = none;
      continue;
    }
    const T* key = k + s * k_stride;
#if defined(PHI4FLASH_AVX512_ATTENTION)
    {
      prefetch_values(v + s * v_stride, pairs * width);
      alignas(64) float lanes[16];
#if defined(__AVX512BF16__)
      if (raw_queries != nullptr && Dh % 32 == 0) {  // bfloat16 products summed in float32, 32 per instruction
        const at::BFloat16* keys = reinterpret_cast<const at::BFloat16*>(key);
        for (int64_t h0 = 0; h0 < H4; h0 += 4) {
          __m512 sum[4];
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            const at::BFloat16* kh = keys + key_head(std::min(h0 + i, H - 1), g) * Dh;
            const at::BFloat16* qh = raw_queries + (h0 + i) * Dh;
            sum[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < Dh; d += 32)
              sum[i] = _mm512_dpbf16_ps(sum[i], (__m512bh)_mm512_loadu_si512(qh + d),
                                        (__m512bh)_mm512_loadu_si512(kh + d));
          }
          _mm512_store_ps(lanes, _mm512_mul_ps(sum_each(sum[0], sum[1], sum[2], sum[3]), _mm512_set1_ps(scale)));
          for (int i = 0; i < 4; ++i) scores[(h0 + i) * len + s] = lanes[4 * i];
        }
        continue;
      }
#endif
      for (int64_t h0 = 0; h0 < H4; h0 += 4) {
        __m512 sum[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const T* kh = key + key_head(std::min(h0 + i, H - 1), g) * Dh;  // a padding row reads real keys
          const float* qh = queries + (h0 + i) * Dh;
          sum[i] = _mm512_setzero_ps();
          for (int64_t d = 0; d < Dh; d += 16) {
            const __mmask16 m = first_lanes(Dh - d);
            sum[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qh + d), load16(kh + d, m), sum[i]);
          }
        }
        _mm512_store_ps(lanes, sum_each(sum[0], sum[1], sum[2], sum[3]));
        for (int i = 0; i < 4; ++i) scores[(h0 + i) * len + s] = lanes[4 * i];
      }
      continue;
    }
#elif defined(PHI4FLASH_AVX2_ATTENTION)
    if (vector_path) {
      prefetch_values(v + s * v_stride, pairs * width);
      score_position(queries, key, scores + s, len, H, H4, Dh, g);
      continue;
    }
#endif
    for (int64_t h = 0; h < H; ++h) {
      load_floats(key + key_head(h, g) * Dh, buf, Dh);
      scores[h * len + s] = dot(queries + h * Dh, buf, Dh);
    }
  }
  for (int64_t h = 0; h < H; ++h) {
    float* row = scores + h * len;
    float best = none;
    for (int64_t s = 0; s < len; ++s) best = std::max(best, row[s]);
    block_max[h] = best;
    block_sum[h] = best == none ? 0.f : exp_shifted(row, len, best);
  }
#if defined(PHI4FLASH_AVX512_ATTENTION)
  {
    // per kv pair, four of its heads by 64 outputs at a time: 16 sums in registers over the block's positions
    for (int64_t p = 0; p < pairs; ++p)
      for (int64_t r0 = 0; r0 < 2 * g; r0 += 4)
        for (int64_t d0 = 0; d0 < width; d0 += 64) {
          const int64_t first = 2 * p * g + r0, heads = std::min<int64_t>(4, 2 * g - r0);
          __mmask16 live[4];
          for (int c = 0; c < 4; ++c) live[c] = first_lanes(width - d0 - 16 * c);
          __m512 sum[4][4];
          for (int i = 0; i < 4; ++i)
            for (int c = 0; c < 4; ++c) sum[i][c] = _mm512_setzero_ps();
          for (int64_t s = 0; s < len; ++s) {
            if (valid && !valid[s]) continue;
            const T* vp = v + s * v_stride + 2 * p * Dh + d0;
            __m512 x[4];
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) x[c] = load16(vp + 16 * c, live[c]);
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {
              const __m512 w = _mm512_set1_ps(i < heads ? scores[(first + i) * len + s] : 0.f);
#pragma GCC unroll 4
              for (int c = 0; c < 4; ++c) sum[i][c] = _mm512_fmadd_ps(w, x[c], sum[i][c]);
            }
          }
          for (int64_t i = 0; i < heads; ++i)
            for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(acc + (first + i) * width + d0 + 16 * c, live[c], sum[i][c]);
        }
    return;
  }
#elif defined(PHI4FLASH_AVX2_ATTENTION)
  if (vector_path) {
    // Per run of 16 positions and kv pair, four of its heads by 16 outputs at a time, added to the block's
    // outputs: the run's values of one pair (4 KB in the real model) stay in L1 across the passes over the
    // pair's width (passes over the whole block read them from L3).
    constexpr int64_t kRun = 16;
    float* no_weights = buf + width;  // (len) zeros: a padding head's weights
    float* no_output = no_weights + len;  // (16): where a padding head's sums go
    std::fill(no_weights, no_output + 16, 0.f);
    std::fill(acc, acc + H * width, 0.f);
    for (int64_t s0 = 0; s0 < len; s0 += kRun) {
      const int64_t s1 = std::min(len, s0 + kRun);
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t r0 = 0; r0 < 2 * g; r0 += 4) {
          const int64_t first = 2 * p * g + r0, heads = std::min<int64_t>(4, 2 * g - r0);
          const float* w[4];
          for (int i = 0; i < 4; ++i) w[i] = i < heads ? scores + (first + i) * len : no_weights;
          for (int64_t d0 = 0; d0 < width; d0 += 16) {
            float* out[4];
            for (int i = 0; i < 4; ++i) out[i] = i < heads ? acc + (first + i) * width + d0 : no_output;
            const T* vp = v + 2 * p * Dh + d0;
            if (width - d0 >= 16)
              add_values<T, true>(vp, v_stride, valid, s0, s1, w, out, 16);
            else
              add_values<T, false>(vp, v_stride, valid, s0, s1, w, out, width - d0);
          }
        }
    }
    return;
  }
#endif
  std::fill(acc, acc + H * width, 0.f);
  for (int64_t s = 0; s < len; ++s) {
    if (valid && !valid[s]) continue;
    const T* value = v + s * v_stride;
    for (int64_t p = 0; p < pairs; ++p) {
      load_floats(value + 2 * p * Dh, buf, width);
      for (int64_t h = 2 * p * g; h < 2 * (p + 1) * g; ++h) {  // pair p's query heads
        const float w = scores[h * len + s];
        float* a = acc + h * width;
        for (int64_t d = 0; d < width; ++d) a[d] += w * buf[d];
      }
    }
  }
}

// Every head's attention output (B, 2, H / 2, 2 Dh) in float: [group][pair-index], normalised.
template <typename T>
std::vector<float> attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* valid,
                          float scale) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S = k.size(1), Hkv = k.size(2);
  const int64_t g = H / Hkv, H4 = (H + 3) / 4 * 4, width = 2 * Dh;
  const int64_t positions = job_positions(S);
  const int64_t blocks = std::max<int64_t>(1, (S + positions - 1) / positions);
  std::vector<float> queries(B * H4 * Dh, 0.f);
  std::vector<at::BFloat16> raw(std::is_same<T, at::BFloat16>::value ? B * H4 * Dh : 0, at::BFloat16(0.f));
  const T* qp = q.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < H * Dh; ++i) {
      queries[b * H4 * Dh + i] = static_cast<float>(qp[b * H * Dh + i]) * scale;
      if (!raw.empty()) raw[b * H4 * Dh + i] = static_cast<at::BFloat16>(static_cast<float>(qp[b * H * Dh + i]));
    }
  std::vector<float> maxima(B * blocks * H), sums(B * blocks * H), partial(B * blocks * H * width);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / blocks;
      int64_t s0 = (job % blocks) * positions, len = std::min(positions, S - s0);
      if (valid != nullptr && len > 0) {  // leave out the block's invalid ends: a static step's mask marks the
        const bool* live = valid + b * S + s0;  // whole free tail of the cache (or ring) invalid
        int64_t lead = 0;
        while (lead < len && !live[lead]) ++lead;
        while (len > lead && !live[len - 1]) --len;
        s0 += lead;
        len -= lead;
      }
      if (len <= 0) {  // nothing to attend in this block
        std::fill(maxima.begin() + job * H, maxima.begin() + (job + 1) * H, -std::numeric_limits<float>::infinity());
        std::fill(sums.begin() + job * H, sums.begin() + (job + 1) * H, 0.f);
        continue;
      }
      attend_block<T>(queries.data() + b * H4 * Dh, raw.empty() ? nullptr : raw.data() + b * H4 * Dh, scale,
                      kp + b * k.stride(0) + s0 * k.stride(1),
                      vp + b * v.stride(0) + s0 * v.stride(1), k.stride(1), v.stride(1),
                      valid ? valid + b * S + s0 : nullptr, len, H, Dh, g, maxima.data() + job * H,
                      sums.data() + job * H, partial.data() + job * H * width, scratch);
    }
  });
  // combine the blocks: softmax over all positions = each block's rescaled by exp(its max - the overall max)
  std::vector<float> heads(B * H * width, 0.f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < blocks; ++j) best = std::max(best, maxima[(b * blocks + j) * H + h]);
      float* o = heads.data() + ((b * 2 + h % 2) * (H / 2) + h / 2) * width;
      float total = 0.f;
      if (best != -std::numeric_limits<float>::infinity())
        for (int64_t j = 0; j < blocks; ++j) {
          const int64_t at = (b * blocks + j) * H + h;
          if (sums[at] == 0.f) continue;
          const float factor = std::exp(maxima[at] - best);
          total += sums[at] * factor;
          const float* a = partial.data() + at * width;
          for (int64_t d = 0; d < width; ++d) o[d] += a[d] * factor;
        }
      const float norm = total > 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < width; ++d) o[d] *= norm;
    }
  return heads;
}

// The differential combination of attend's heads, as ops.differential_attention computes it in dtype T (the
// same roundings): per pair j, y = O1 - lambda O2 over 2 Dh channels, RMS-normalised in float32, times the
// subln gain (G: its dtype, float32 or bfloat16; the model multiplies by it as dtype T holds it), times
// (1 - lambda_init); pair j becomes heads 2j and 2j + 1 of out (B, H Dh).
template <typename T, typename G>
void combine(const std::vector<float>& heads, int64_t B, int64_t H, int64_t width, float lam, const G* gain,
             float scaling, float eps, T* out) {
  const int64_t pairs = H / 2;
  const float lam_held = held<T>(lam);
  std::vector<float> y(width);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < pairs; ++j) {
      const float* o1 = heads.data() + ((b * 2) * pairs + j) * width;
      const float* o2 = heads.data() + ((b * 2 + 1) * pairs + j) * width;
      float squares = 0.f;
      for (int64_t d = 0; d < width; ++d) {
        y[d] = held<T>(held<T>(o1[d]) - held<T>(lam_held * held<T>(o2[d])));
        squares += y[d] * y[d];
      }
      const float inverse_rms = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
      T* dst = out + (b * pairs + j) * width;
      for (int64_t d = 0; d < width; ++d)
        dst[d] = static_cast<T>(
            held<T>(held<T>(y[d] * inverse_rms) * held<T>(static_cast<float>(gain[d]))) * scaling);
    }
}

void check_decode_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& key_valid) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: contiguous (B, H, Dh)");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k, v: (B, S, Hkv, Dh), the same shape");
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == Dh && Hkv % 2 == 0 && H % Hkv == 0,
              "shapes: q (B, H, Dh), k/v (B, S, Hkv, Dh) with Hkv even and dividing H");
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == Dh && t->scalar_type() == q.scalar_type(),
                "k, v: q's dtype, each position's heads contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "differential decode attention: float32 or bfloat16, got ", q.scalar_type());
  if (key_valid.has_value())
    TORCH_CHECK(key_valid->scalar_type() == at::kBool && key_valid->is_contiguous() && key_valid->size(0) == B &&
                    key_valid->size(1) == S,
                "key_valid: contiguous bool (B, S)");
}

std::vector<float> attend_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& key_valid, double scale) {
  check_decode_inputs(q, k, v, key_valid);
  const bool* valid = key_valid.has_value() ? key_valid->data_ptr<bool>() : nullptr;
  if (q.scalar_type() == at::kFloat) return attend<float>(q, k, v, valid, static_cast<float>(scale));
  return attend<at::BFloat16>(q, k, v, valid, static_cast<float>(scale));
}

}  // namespace

at::Tensor diff_attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& key_valid, double scale) {
  const std::vector<float> heads = attend_heads(q, k, v, key_valid, scale);
  auto out = at::empty({q.size(0), 2, q.size(1) / 2, 2 * q.size(2)}, q.options());
  if (q.scalar_type() == at::kFloat)
    std::copy(heads.begin(), heads.end(), out.data_ptr<float>());
  else
    std::transform(heads.begin(), heads.end(), out.data_ptr<at::BFloat16>(),
                   [](float x) { return static_cast<at::BFloat16>(x); });
  return out;
}

at::Tensor diff_attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& key_valid, double scale, const at::Tensor& lam,
                               const at::Tensor& subln_weight, double lambda_init, double eps) {
  const std::vector<float> heads = attend_heads(q, k, v, key_valid, scale);
  const int64_t B = q.size(0), H = q.size(1), width = 2 * q.size(2);
  TORCH_CHECK(lam.numel() == 1, "lam: one value");
  TORCH_CHECK(subln_weight.dim() == 1 && subln_weight.size(0) == width, "subln_weight: (2 Dh,)");
  // read in place as the model keeps it (float32 or bfloat16); any other layout converted once here
  const bool in_place = subln_weight.is_contiguous() && (subln_weight.scalar_type() == at::kFloat ||
                                                         subln_weight.scalar_type() == at::kBFloat16);
  const at::Tensor gain = in_place ? subln_weight : subln_weight.to(at::kFloat).contiguous();
  const float lambda = lam.item<float>();
  const float scaling = static_cast<float>(1.0 - lambda_init);
  auto out = at::empty({B, H * q.size(2)}, q.options());
  const auto run = [&](auto* dst) {  // dst: float* or at::BFloat16*, q's dtype
    if (gain.scalar_type() == at::kFloat)
      combine(heads, B, H, width, lambda, gain.data_ptr<float>(), scaling, static_cast<float>(eps), dst);
    else
      combine(heads, B, H, width, lambda, gain.data_ptr<at::BFloat16>(), scaling, static_cast<float>(eps), dst);
  };
  if (q.scalar_type() == at::kFloat)
    run(out.data_ptr<float>());
  else
    run(out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace phi4flash
