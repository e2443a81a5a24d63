// The Mamba mixer's one-token decode step on the CPU, the work between its projections in two calls:
//
//   conv_step: state <- [state[1:], x];  x' = SiLU(state . w + bias)                         (per channel)
//   scan_step: delta = softplus(dt + dt_bias);  s <- exp(delta A) s + delta u B;  y = C . s + D u;  A = -exp(A_log)
//              out = y SiLU(z)   (the memory-emitting layer: memory = y in the model's dtype, out = memory SiLU(z))
//
// In PyTorch these are some 40 small operations per layer (each a few microseconds of dispatch and a pass over
// the channels); here each is one pass. The roundings are the model's (ops.causal_conv1d_step,
// ops.selective_scan_step, Mamba._gate): float32 arithmetic, results rounded to the model's dtype where it
// rounds them. A decode step's state is (E, N) per row with a channel's N values contiguous, so the scan takes
// the N states of one channel as lanes (8 at a time with AVX2) and sums its read-out across them.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace phi4flash {
namespace {

constexpr int64_t kChannelsPerJob = 512;

// softplus with PyTorch's defaults (beta 1, threshold 20)
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

#if defined(__AVX2__) && defined(__FMA__)
// log(x) of 8 lanes, x > 0 finite and normal: x = m 2^k with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^11 (relative error below 1e-8)
inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  // m in [1, 2), then halved when above sqrt(2)
  __m256i exponent = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                                 _mm256_set1_epi32(0x3F800000)));
  const __m256 high = _mm256_cmp_ps(m, _mm256_set1_ps(1.41421356f), _CMP_GT_OQ);
  m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), high);
  exponent = _mm256_add_epi32(exponent, _mm256_and_si256(_mm256_castps_si256(high), _mm256_set1_epi32(1)));
  const __m256 s = _mm256_div_ps(_mm256_sub_ps(m, _mm256_set1_ps(1.f)), _mm256_add_ps(m, _mm256_set1_ps(1.f)));
  const __m256 s2 = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(2.f / 11);
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(2.f / 9));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(2.f / 7));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(2.f / 5));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(2.f / 3));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(2.f));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(exponent), _mm256_set1_ps(0.693147180559945f), _mm256_mul_ps(p, s));
}

// softplus of 8 lanes: max(x, 0) + log1p(exp(-|x|)), log1p(t) as log(1 + t) t / ((1 + t) - 1) (exact where
// 1 + t rounds to 1: then t); x above 20 gives x, as PyTorch's threshold
inline __m256 softplus8(__m256 x) {
  const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.f), x);
  const __m256 t = exp_nonpositive(_mm256_sub_ps(_mm256_setzero_ps(), magnitude));
  const __m256 one_plus = _mm256_add_ps(_mm256_set1_ps(1.f), t);
  const __m256 denominator = _mm256_sub_ps(one_plus, _mm256_set1_ps(1.f));
  const __m256 exact = _mm256_cmp_ps(denominator, _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 log1p = _mm256_blendv_ps(
      _mm256_div_ps(_mm256_mul_ps(log8(one_plus), t), _mm256_blendv_ps(denominator, _mm256_set1_ps(1.f), exact)), t,
      exact);
  const __m256 result = _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), log1p);
  return _mm256_blendv_ps(result, x, _mm256_cmp_ps(x, _mm256_set1_ps(20.f), _CMP_GT_OQ));
}
#endif

// SiLU and softplus of n values in place (8 at a time where the CPU has AVX2)
inline void silu_all(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, silu8(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = silu(x[i]);
}

inline void softplus_all(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, softplus8(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) x[i] = softplus(x[i]);
}

template <typename T>
void conv_rows(const at::Tensor& x, const at::Tensor& weight, const T* bias, at::Tensor& state, at::Tensor& out) {
  const int64_t B = state.size(0), E = state.size(1), K = state.size(2), x_row = x.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* sp = state.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, E, kChannelsPerJob, [&](int64_t e0, int64_t e1) {
    std::vector<float> y(e1 - e0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t e = e0; e < e1; ++e) {
        T* s = sp + (b * E + e) * K;
        const T* w = wp + e * K;
        for (int64_t k = 0; k + 1 < K; ++k) s[k] = s[k + 1];
        s[K - 1] = xp[b * x_row + e];
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += static_cast<float>(s[k]) * static_cast<float>(w[k]);
        y[e - e0] = bias ? sum + static_cast<float>(bias[e]) : sum;
      }
      silu_all(y.data(), e1 - e0);
      for (int64_t e = e0; e < e1; ++e) op[b * E + e] = static_cast<T>(y[e - e0]);
    }
  });
}

// channel e's state (N floats) advanced by one step, its decay rates A = -exp(A_log) computed from the parameter
// each step (a copy kept between steps could miss an update that bypasses PyTorch's version counter, such as a
// fused optimizer's); returns C . s
inline float advance(float* s, const float* a_log, float delta, float du, const float* Bv, const float* Cv,
                     int64_t N) {
#if defined(__AVX2__) && defined(__FMA__)
  if (N % 8 == 0) {
    const __m256 minus_dt = _mm256_set1_ps(-delta), dus = _mm256_set1_ps(du);
    __m256 read = _mm256_setzero_ps();
    for (int64_t n = 0; n < N; n += 8) {
      const __m256 rate = exp8(_mm256_loadu_ps(a_log + n));
      const __m256 decay = exp_nonpositive(_mm256_mul_ps(minus_dt, rate));
      const __m256 next = _mm256_fmadd_ps(decay, _mm256_loadu_ps(s + n), _mm256_mul_ps(dus, _mm256_loadu_ps(Bv + n)));
      _mm256_storeu_ps(s + n, next);
      read = _mm256_fmadd_ps(next, _mm256_loadu_ps(Cv + n), read);
    }
    return reduce_add8(read);
  }
#endif
  float read = 0.f;
  for (int64_t n = 0; n < N; ++n) {
    s[n] = std::exp(-delta * std::exp(a_log[n])) * s[n] + du * Bv[n];
    read += s[n] * Cv[n];
  }
  return read;
}

template <typename T, typename P>
void scan_rows(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& dt_bias, const at::Tensor& A_log,
               const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D, const at::Tensor& z,
               at::Tensor& state, bool emits_memory, at::Tensor& out, at::Tensor& memory) {
  const int64_t B = state.size(0), E = state.size(1), N = state.size(2);
  const int64_t u_row = u.stride(0), dt_row = dt.stride(0), z_row = z.stride(0);
  // B and C of each row in float32: (B, N) each
  std::vector<float> bc(2 * B * N);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n) {
      bc[b * N + n] = static_cast<float>(Bm.data_ptr<T>()[b * Bm.stride(0) + n]);
      bc[(B + b) * N + n] = static_cast<float>(Cm.data_ptr<T>()[b * Cm.stride(0) + n]);
    }
  const T* up = u.data_ptr<T>();
  const T* dtp = dt.data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  const P* bias = dt_bias.data_ptr<P>();
  const P* skip = D.has_value() ? D->data_ptr<P>() : nullptr;
  const float* Ap = A_log.data_ptr<float>();
  float* sp = state.data_ptr<float>();
  T* op = out.data_ptr<T>();
  T* mp = emits_memory ? memory.data_ptr<T>() : nullptr;
  at::parallel_for(0, E, kChannelsPerJob, [&](int64_t e0, int64_t e1) {
    const int64_t n = e1 - e0;
    std::vector<float> delta(n), gate(n);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t e = e0; e < e1; ++e) {
        delta[e - e0] = static_cast<float>(dtp[b * dt_row + e]) + static_cast<float>(bias[e]);
        gate[e - e0] = static_cast<float>(zp[b * z_row + e]);
      }
      softplus_all(delta.data(), n);
      silu_all(gate.data(), n);
      for (int64_t e = e0; e < e1; ++e) {
        const float ue = static_cast<float>(up[b * u_row + e]), step = delta[e - e0];
        float y = advance(sp + (b * E + e) * N, Ap + e * N, step, step * ue, bc.data() + b * N,
                          bc.data() + (B + b) * N, N);
        if (skip) y += static_cast<float>(skip[e]) * ue;
        if (emits_memory) {
          const float kept = held<T>(y);
          mp[b * E + e] = static_cast<T>(kept);
          op[b * E + e] = static_cast<T>(kept * held<T>(gate[e - e0]));
        } else {
          op[b * E + e] = static_cast<T>(y * gate[e - e0]);
        }
      }
    }
  });
}

bool is_float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

}  // namespace

at::Tensor conv_step(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     at::Tensor state) {
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous(), "state: contiguous (B, E, K)");
  const int64_t B = state.size(0), E = state.size(1), K = state.size(2);
  TORCH_CHECK(x.dim() == 2 && x.size(0) == B && x.size(1) == E && x.stride(1) == 1, "x: (B, E), channels contiguous");
  TORCH_CHECK(weight.numel() == E * K && weight.is_contiguous(), "weight: contiguous (E, 1, K)");
  const auto dtype = state.scalar_type();
  TORCH_CHECK(is_float_or_bf16(state) && x.scalar_type() == dtype && weight.scalar_type() == dtype,
              "conv_step: x, weight and state of one dtype, float32 or bfloat16");
  if (bias.has_value())
    TORCH_CHECK(bias->numel() == E && bias->is_contiguous() && bias->scalar_type() == dtype, "bias: (E,), state's dtype");
  auto out = at::empty({B, E}, x.options());
  if (dtype == at::kFloat)
    conv_rows<float>(x, weight, bias.has_value() ? bias->data_ptr<float>() : nullptr, state, out);
  else
    conv_rows<at::BFloat16>(x, weight, bias.has_value() ? bias->data_ptr<at::BFloat16>() : nullptr, state, out);
  return out;
}

std::vector<at::Tensor> scan_step(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& dt_bias,
                                  const at::Tensor& A_log, const at::Tensor& Bm, const at::Tensor& Cm,
                                  const c10::optional<at::Tensor>& D, const at::Tensor& z, at::Tensor state,
                                  bool emits_memory) {
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous() && state.scalar_type() == at::kFloat,
              "state: contiguous float32 (B, E, N)");
  const int64_t B = state.size(0), E = state.size(1), N = state.size(2);
  const auto dtype = u.scalar_type();
  TORCH_CHECK(is_float_or_bf16(u), "scan_step: float32 or bfloat16 activations, got ", dtype);
  for (const at::Tensor* t : {&u, &dt, &z})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == E && t->stride(1) == 1 && t->scalar_type() == dtype,
                "u, dt, z: (B, E) of one dtype, channels contiguous");
  for (const at::Tensor* t : {&Bm, &Cm})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == N && t->stride(1) == 1 && t->scalar_type() == dtype,
                "B, C: (B, N) in u's dtype, contiguous along N");
  TORCH_CHECK(A_log.scalar_type() == at::kFloat && A_log.is_contiguous() && A_log.size(0) == E && A_log.size(1) == N,
              "A_log: contiguous float32 (E, N)");
  // the step sizes' bias and the skip: one dtype (the model's, or float32), one value per channel
  const auto parameters = dt_bias.scalar_type();
  TORCH_CHECK(is_float_or_bf16(dt_bias) && dt_bias.numel() == E && dt_bias.is_contiguous(), "dt_bias: (E,)");
  if (D.has_value())
    TORCH_CHECK(D->scalar_type() == parameters && D->numel() == E && D->is_contiguous(), "D: (E,), dt_bias's dtype");
  auto out = at::empty({B, E}, u.options());
  auto memory = emits_memory ? at::empty({B, E}, u.options()) : at::empty({0}, u.options());
  if (dtype == at::kFloat) {
    if (parameters == at::kFloat)
      scan_rows<float, float>(u, dt, dt_bias, A_log, Bm, Cm, D, z, state, emits_memory, out, memory);
    else
      scan_rows<float, at::BFloat16>(u, dt, dt_bias, A_log, Bm, Cm, D, z, state, emits_memory, out, memory);
  } else {
    if (parameters == at::kFloat)
      scan_rows<at::BFloat16, float>(u, dt, dt_bias, A_log, Bm, Cm, D, z, state, emits_memory, out, memory);
    else
      scan_rows<at::BFloat16, at::BFloat16>(u, dt, dt_bias, A_log, Bm, Cm, D, z, state, emits_memory, out, memory);
  }
  return {out, memory};
}

}  // namespace phi4flash
