// Differential attention for one new token per row (decode) on the CPU, reading the K/V cache where it lies.
//
// The cache keeps keys and values as (B, S, Hkv, Dh): kv heads 2p and 2p+1 (pair p) sit side by side, so one
// position's pair is 2 Dh contiguous values. Query head h belongs to group h % 2 and pair-index j = h / 2, and
// uses kv pair p = j / g (g = H / Hkv): its keys are kv head 2p + h % 2, its values the whole pair
// [V_2p || V_2p+1] (2 Dh). One job is one (row, kv pair): the 2g query heads of the pair score every key, take
// the softmax in float32 and sum the pair's values, so each key and value is read once per job and nothing is
// copied (PyTorch's batched matmul copies a strided cache before it multiplies).
//
// Output (B, 2, H / 2, 2 Dh): [group][pair-index], what both head groups' attention gives before the
// differential combination (model code does the rest: O1 - lambda O2, the RMS norm, the scaling).

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace phi4flash {
namespace {

template <typename T>
inline void load_floats(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
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
#endif
  for (; s < S; ++s) {
    p[s] = std::isinf(p[s]) ? 0.f : std::exp(p[s] - max);
    sum += p[s];
  }
  return sum;
}

// One (row, kv pair) job. q: the row's (H, Dh) queries; k, v: the pair's 2 Dh values at position 0, positions
// ``stride`` elements apart; valid: (S,) or null (all valid); out: the row's (2, H / 2, 2 Dh).
template <typename T>
void attend_pair(const T* q, const T* k, const T* v, int64_t k_stride, int64_t v_stride, const bool* valid,
                 T* out, int64_t S, int64_t p, int64_t g, int64_t H, int64_t Dh, float scale,
                 std::vector<float>& scratch) {
  const int64_t rows = 2 * g, width = 2 * Dh;
  scratch.resize(rows * S + rows * Dh + rows * width + width);
  float* scores = scratch.data();      // (rows, S)
  float* queries = scores + rows * S;  // (rows, Dh), scaled
  float* acc = queries + rows * Dh;    // (rows, 2 Dh)
  float* buf = acc + rows * width;     // (2 Dh): one position's pair in float
  // job row r: group r / g, pair-index j = p g + r % g, query head 2 j + group
  for (int64_t r = 0; r < rows; ++r) {
    load_floats(q + (2 * (p * g + r % g) + r / g) * Dh, queries + r * Dh, Dh);
    for (int64_t d = 0; d < Dh; ++d) queries[r * Dh + d] *= scale;
  }
  const float none = -std::numeric_limits<float>::infinity();
  std::vector<float> best(rows, none);
  for (int64_t s = 0; s < S; ++s) {
    if (valid && !valid[s]) {
      for (int64_t r = 0; r < rows; ++r) scores[r * S + s] = none;
      continue;
    }
    load_floats(k + s * k_stride, buf, width);
    for (int64_t r = 0; r < rows; ++r) {
      const float x = dot(queries + r * Dh, buf + (r / g) * Dh, Dh);
      scores[r * S + s] = x;
      best[r] = std::max(best[r], x);
    }
  }
  std::vector<float> sums(rows);
  for (int64_t r = 0; r < rows; ++r) sums[r] = best[r] == none ? 0.f : exp_shifted(scores + r * S, S, best[r]);
  std::fill(acc, acc + rows * width, 0.f);
  for (int64_t s = 0; s < S; ++s) {
    if (valid && !valid[s]) continue;
    load_floats(v + s * v_stride, buf, width);
    for (int64_t r = 0; r < rows; ++r) {
      const float weight = scores[r * S + s];
      float* a = acc + r * width;
      for (int64_t d = 0; d < width; ++d) a[d] += weight * buf[d];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float norm = sums[r] > 0.f ? 1.f / sums[r] : 0.f;
    T* o = out + ((r / g) * (H / 2) + p * g + r % g) * width;
    for (int64_t d = 0; d < width; ++d) o[d] = static_cast<T>(acc[r * width + d] * norm);
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// lane 4 i of the result = the sum of a_i's lanes (i = 0..3)
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

// attend_pair vectorised, for a head width Dh = 16 QC (a multiple of 32, so that 2 Dh splits into 64-wide
// chunks): the job's rows four at a time, one horizontal sum for the four scores of a position, and the value
// accumulators (four rows by 64 outputs) in registers.
template <typename T, int QC>
void attend_pair_simd(const T* q, const T* k, const T* v, int64_t k_stride, int64_t v_stride, const bool* valid,
                      T* out, int64_t S, int64_t p, int64_t g, int64_t H, float scale, std::vector<float>& scratch) {
  constexpr int64_t Dh = 16 * QC, width = 2 * Dh;
  const int64_t rows = 2 * g, padded = (rows + 3) / 4 * 4;
  scratch.resize(padded * S + padded * Dh);
  float* scores = scratch.data();          // (padded, S)
  float* queries = scores + padded * S;    // (padded, Dh), scaled; rows past ``rows`` are zero
  std::fill(queries, queries + padded * Dh, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < Dh; ++d)
      queries[r * Dh + d] = static_cast<float>(q[(2 * (p * g + r % g) + r / g) * Dh + d]) * scale;
  const float none = -std::numeric_limits<float>::infinity();
  std::vector<float> best(padded, none);
  alignas(64) float lanes[16];
  for (int64_t s = 0; s < S; ++s) {
    if (valid && !valid[s]) {
      for (int64_t r = 0; r < padded; ++r) scores[r * S + s] = none;
      continue;
    }
    const T* key = k + s * k_stride;
    for (int64_t r0 = 0; r0 < padded; r0 += 4) {
      __m512 acc[4];
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) {
        // a padding row (past ``rows``) has zero queries; it reads group 1's keys, which exist
        const T* kr = key + std::min<int64_t>((r0 + i) / g, 1) * Dh;
        const float* qr = queries + (r0 + i) * Dh;
        acc[i] = _mm512_mul_ps(_mm512_loadu_ps(qr), load16(kr));
#pragma GCC unroll 4
        for (int c = 1; c < QC; ++c) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), load16(kr + 16 * c), acc[i]);
      }
      _mm512_store_ps(lanes, sum_each(acc[0], acc[1], acc[2], acc[3]));
      for (int i = 0; i < 4; ++i) {
        scores[(r0 + i) * S + s] = lanes[4 * i];
        best[r0 + i] = std::max(best[r0 + i], lanes[4 * i]);
      }
    }
  }
  std::vector<float> norm(padded, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const float sum = best[r] == none ? 0.f : exp_shifted(scores + r * S, S, best[r]);
    norm[r] = sum > 0.f ? 1.f / sum : 0.f;
  }
  for (int64_t r0 = 0; r0 < padded; r0 += 4)
    for (int64_t d0 = 0; d0 < width; d0 += 64) {
      __m512 acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        if (valid && !valid[s]) continue;
        const T* value = v + s * v_stride + d0;
        __m512 x[4];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) x[c] = load16(value + 16 * c);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          const __m512 w = _mm512_set1_ps(scores[(r0 + i) * S + s]);
#pragma GCC unroll 4
          for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(w, x[c], acc[i][c]);
        }
      }
      for (int64_t i = 0; i < 4 && r0 + i < rows; ++i) {
        const int64_t r = r0 + i;
        T* o = out + ((r / g) * (H / 2) + p * g + r % g) * width + d0;
        for (int c = 0; c < 4; ++c) {
          alignas(64) float tmp[16];
          _mm512_store_ps(tmp, _mm512_mul_ps(acc[i][c], _mm512_set1_ps(norm[r])));
          for (int l = 0; l < 16; ++l) o[16 * c + l] = static_cast<T>(tmp[l]);
        }
      }
    }
}
#endif

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* valid, at::Tensor& out,
            float scale) {
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S = k.size(1), Hkv = k.size(2);
  const int64_t pairs = Hkv / 2, g = H / Hkv;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / pairs, p = job % pairs;
      const T* qb = qp + b * H * Dh;
      const T* kb = kp + b * k.stride(0) + 2 * p * Dh;
      const T* vb = vp + b * v.stride(0) + 2 * p * Dh;
      const bool* vb_valid = valid ? valid + b * S : nullptr;
      T* ob = op + b * H * Dh * 2;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if (Dh == 64) {
        attend_pair_simd<T, 4>(qb, kb, vb, k.stride(1), v.stride(1), vb_valid, ob, S, p, g, H, scale, scratch);
        continue;
      }
      if (Dh == 32) {
        attend_pair_simd<T, 2>(qb, kb, vb, k.stride(1), v.stride(1), vb_valid, ob, S, p, g, H, scale, scratch);
        continue;
      }
#endif
      attend_pair<T>(qb, kb, vb, k.stride(1), v.stride(1), vb_valid, ob, S, p, g, H, Dh, scale, scratch);
    }
  });
}

}  // namespace

at::Tensor diff_attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& key_valid, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous(), "q: contiguous (B, H, Dh)");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k, v: (B, S, Hkv, Dh), the same shape");
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2), S = k.size(1), Hkv = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == Dh && Hkv % 2 == 0 && H % Hkv == 0,
              "shapes: q (B, H, Dh), k/v (B, S, Hkv, Dh) with Hkv even and dividing H");
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == Dh && t->scalar_type() == q.scalar_type(),
                "k, v: q's dtype, each position's heads contiguous");
  const bool* valid = nullptr;
  if (key_valid.has_value()) {
    TORCH_CHECK(key_valid->scalar_type() == at::kBool && key_valid->is_contiguous() && key_valid->size(0) == B &&
                    key_valid->size(1) == S,
                "key_valid: contiguous bool (B, S)");
    valid = key_valid->data_ptr<bool>();
  }
  auto out = at::empty({B, 2, H / 2, 2 * Dh}, q.options());
  if (q.scalar_type() == at::kFloat)
    attend<float>(q, k, v, valid, out, static_cast<float>(scale));
  else if (q.scalar_type() == at::kBFloat16)
    attend<at::BFloat16>(q, k, v, valid, out, static_cast<float>(scale));
  else
    TORCH_CHECK(false, "diff_attention_decode: float32 or bfloat16, got ", q.scalar_type());
  return out;
}

}  // namespace phi4flash
