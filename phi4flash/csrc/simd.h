// Vector helpers shared by phi4flash's CPU kernels.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
// 8-lane helpers, on every CPU with AVX2 and FMA (AVX-512 ones too: the kernels that work 8 lanes at a time
// there, such as the int4 tiles of a CPU without VNNI, use them)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace phi4flash {

// the first n (at most 8) lanes on (sign bit set), as _mm256_maskload_ps / _mm256_maskstore_ps take them
inline __m256i first_lanes8(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float reduce_add8(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}

// lane i of the result = the sum of v[i]'s lanes (i = 0..7): eight horizontal sums for the price of two
inline __m256 sum_each8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// the same for four vectors: lane i = the sum of v[i]'s lanes (i = 0..3)
inline __m128 sum_each4(const __m256* v) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// exp(x) for -87 <= x <= 88, by the AVX-512 exp_nonpositive's polynomial; x is clamped to [-88, 88] (88 gives
// 1.65e38, the largest 2^k AVX2 builds from exponent bits: k <= 127). Below -87, 2^k underflows the exponent
// bits: use exp_nonpositive, which gives 0 there.
inline __m256 exp8(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.f)), _mm256_set1_ps(88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), clamped);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// exp(x) for x <= 0 (decays): exp8, and 0 below -87, as expf underflows
inline __m256 exp_nonpositive(__m256 x) {
  return _mm256_blendv_ps(exp8(x), _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ));
}

// SiLU of 8 lanes: x sigmoid(x), with e = exp(-|x|) <= 1 so that nothing overflows
inline __m256 silu8(__m256 x) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), magnitude));
  const __m256 r = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f), e));
  const __m256 sigmoid = _mm256_blendv_ps(_mm256_mul_ps(e, r), r, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ));
  return _mm256_mul_ps(x, sigmoid);
}

// 8 bfloat16 -> 8 floats (a bfloat16 is the top half of a float's bits)
inline __m256 bf16x8_to_floats(__m128i raw) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load_bf16x8(const at::BFloat16* p) {
  return bf16x8_to_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// each lane's float bits plus the rounding bias of round-to-nearest-even at bfloat16's last bit (finite values):
// the top 16 bits of the result are the rounded bfloat16
inline __m256i bf16_rounding8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  return _mm256_add_epi32(u, bias);
}

// 8 floats as bfloat16 holds them (held<at::BFloat16> of each lane), still floats
inline __m256 held_bf16x8(__m256 v) {
  return _mm256_castsi256_ps(_mm256_and_si256(bf16_rounding8(v), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// 8 floats -> 8 bfloat16 (rounding to nearest even, finite values) stored at dst
inline void store_bf16x8(at::BFloat16* dst, __m256 v) {
  const __m256i r = _mm256_srli_epi32(bf16_rounding8(v), 16);  // (0..0xFFFF) per 32-bit lane
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 64-bit lanes 0, 2 first
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
}

}  // namespace phi4flash
#endif

#if defined(__AVX512F__)
#include <c10/util/BFloat16.h>
#include <immintrin.h>

namespace phi4flash {

// 16 bfloat16 -> 16 floats (a bfloat16 is the top half of a float's bits)
inline __m512 bf16x16_to_floats(__m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load_bf16x16(const at::BFloat16* p) {
  return bf16x16_to_floats(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// the lanes of ``mask`` only (nothing past them is read); the others 0
inline __m512 load_bf16x16(const at::BFloat16* p, __mmask16 mask) {
  return bf16x16_to_floats(_mm256_maskz_loadu_epi16(mask, p));
}
#endif

// exp(x) for x <= 0 (decays): 2^k p(r) with k = round(x log2 e), r = x - k ln 2, p a degree-6 Taylor
// polynomial (|r| <= ln2/2: relative error below 2e-7); x below -87 gives 0, as expf underflows.
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 out = _mm512_scalef_ps(p, k);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ), out, _mm512_setzero_ps());
}

}  // namespace phi4flash

#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 without AVX-512 (most laptops and AMD servers before Zen 4): the kernels' 8-lane paths.
#define PHI4FLASH_SIMD_AVX2 1
#endif
