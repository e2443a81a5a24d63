// Vector helpers shared by phi4flash's CPU kernels.
#pragma once

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
#endif
