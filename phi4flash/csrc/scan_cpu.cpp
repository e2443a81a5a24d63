// The Mamba-1 selective scan on the CPU, one pass over the sequence with the state in registers:
//
//   s_t = exp(delta_t * A) * s_{t-1} + delta_t * u_t * B_t;   y_t = C_t . s_t + D * u_t
//
// Layouts: u, delta, y (B, T, E); Bm, Cm (B, T, N); A (E, N); D (E,); state (B, E, N). float32 throughout.
// Sixteen channels share one AVX-512 register (lanes = channels), so the N states of a block of channels are
// N registers and neither the decays nor the read-out need a horizontal sum. Blocks of channels run in
// parallel; each walks the sequence once.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <cmath>

namespace phi4flash {
namespace {

#if defined(__AVX512F__)

template <int N>
void scan_block(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm, const float* D,
                const float* state_in, float* state_out, float* y, int64_t T, int64_t E, int64_t e0) {
  const int64_t lanes = std::min<int64_t>(16, E - e0);
  const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
  alignas(64) float a_t[N][16] = {}, s_t[N][16] = {};
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) {
      a_t[n][l] = A[(e0 + l) * N + n];
      s_t[n][l] = state_in ? state_in[(e0 + l) * N + n] : 0.f;
    }
  __m512 a[N], s[N];
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) a[n] = _mm512_load_ps(a_t[n]), s[n] = _mm512_load_ps(s_t[n]);
  const __m512 d = D ? _mm512_maskz_loadu_ps(mask, D + e0) : _mm512_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m512 dt = _mm512_maskz_loadu_ps(mask, delta + t * E + e0);
    const __m512 ut = _mm512_maskz_loadu_ps(mask, u + t * E + e0);
    const __m512 du = _mm512_mul_ps(dt, ut);
    __m512 out = _mm512_mul_ps(d, ut);
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      const __m512 decay = exp_nonpositive(_mm512_mul_ps(dt, a[n]));
      s[n] = _mm512_fmadd_ps(decay, s[n], _mm512_mul_ps(du, _mm512_set1_ps(Bm[t * N + n])));
      out = _mm512_fmadd_ps(s[n], _mm512_set1_ps(Cm[t * N + n]), out);
    }
    _mm512_mask_storeu_ps(y + t * E + e0, mask, out);
  }
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) _mm512_store_ps(s_t[n], s[n]);
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) state_out[(e0 + l) * N + n] = s_t[n][l];
}
#endif

// Any N, no SIMD: the definition, channel by channel.
void scan_block_generic(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                        const float* D, const float* state_in, float* state_out, float* y, int64_t T, int64_t E,
                        int64_t N, int64_t e0) {
  for (int64_t e = e0; e < std::min<int64_t>(e0 + 16, E); ++e) {
    float s[64];
    for (int64_t n = 0; n < N; ++n) s[n] = state_in ? state_in[e * N + n] : 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float dt = delta[t * E + e], ut = u[t * E + e];
      float out = D ? D[e] * ut : 0.f;
      for (int64_t n = 0; n < N; ++n) {
        s[n] = std::exp(dt * A[e * N + n]) * s[n] + dt * ut * Bm[t * N + n];
        out += s[n] * Cm[t * N + n];
      }
      y[t * E + e] = out;
    }
    for (int64_t n = 0; n < N; ++n) state_out[e * N + n] = s[n];
  }
}

}  // namespace

std::vector<at::Tensor> selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                       const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D,
                                       const c10::optional<at::Tensor>& state) {
  auto f32 = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), name, ": contiguous float32");
  };
  f32(u, "u");
  f32(delta, "delta");
  f32(A, "A");
  f32(Bm, "B");
  f32(Cm, "C");
  const int64_t batch = u.size(0), T = u.size(1), E = u.size(2), N = A.size(1);
  TORCH_CHECK(delta.sizes() == u.sizes() && A.size(0) == E && Bm.size(0) == batch && Bm.size(1) == T &&
                  Bm.size(2) == N && Cm.sizes() == Bm.sizes() && N <= 64,
              "shapes: u, delta (B, T, E); A (E, N); B, C (B, T, N); N <= 64");
  if (D.has_value()) f32(*D, "D");
  if (state.has_value()) {
    f32(*state, "state");
    TORCH_CHECK(state->size(0) == batch && state->size(1) == E && state->size(2) == N, "state (B, E, N)");
  }
  auto y = at::empty_like(u);
  auto last = at::empty({batch, E, N}, u.options());
  const float* Dp = D.has_value() ? D->data_ptr<float>() : nullptr;
  const int64_t blocks = (E + 15) / 16;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / blocks, e0 = (job % blocks) * 16;
      const float* up = u.data_ptr<float>() + b * T * E;
      const float* dp = delta.data_ptr<float>() + b * T * E;
      const float* Bp = Bm.data_ptr<float>() + b * T * N;
      const float* Cp = Cm.data_ptr<float>() + b * T * N;
      const float* sin = state.has_value() ? state->data_ptr<float>() + b * E * N : nullptr;
      float* sout = last.data_ptr<float>() + b * E * N;
      float* yp = y.data_ptr<float>() + b * T * E;
      const float* Ap = A.data_ptr<float>();
#if defined(__AVX512F__)
      if (N == 16) { scan_block<16>(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, e0); continue; }
      if (N == 8) { scan_block<8>(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, e0); continue; }
      if (N == 4) { scan_block<4>(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, e0); continue; }
#endif
      scan_block_generic(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, N, e0);
    }
  });
  return {y, last};
}

}  // namespace phi4flash
