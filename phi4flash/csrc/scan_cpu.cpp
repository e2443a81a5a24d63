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
  // lane l holds channel e0 + l: state n of the 16 channels is every N-th float of the (E, N) layouts, gathered
  // (a one-token decode step is mostly this load and the store back)
  const __m512i channel = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(N));
  __m512 a[N], s[N];
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) {
    a[n] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, channel, A + e0 * N + n, 4);
    s[n] = state_in ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, channel, state_in + e0 * N + n, 4)
                    : _mm512_setzero_ps();
  }
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
  for (int n = 0; n < N; ++n) _mm512_mask_i32scatter_ps(state_out + e0 * N + n, mask, channel, s[n], 4);
}
#elif defined(PHI4FLASH_SIMD_AVX2)

// A channel's N values (of A, a state) for lanes e0.. of an (E, N) layout, n-major: tmp[n][lane] (0 past E)
template <int N>
inline void channels_to_lanes(const float* src, int64_t lanes, int64_t e0, float (*tmp)[8]) {
  for (int64_t l = 0; l < 8; ++l)
    for (int n = 0; n < N; ++n) tmp[n][l] = src && l < lanes ? src[(e0 + l) * N + n] : 0.f;
}

template <int N>
inline void lanes_to_channels(const __m256* v, int64_t lanes, int64_t e0, float* dst) {
  alignas(32) float tmp[N][8];
  for (int n = 0; n < N; ++n) _mm256_store_ps(tmp[n], v[n]);
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) dst[(e0 + l) * N + n] = tmp[n][l];
}

// The AVX-512 scan_block on 8 lanes: channels e0 .. e0 + 7.
template <int N>
void scan_half_block(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                     const float* D, const float* state_in, float* state_out, float* y, int64_t T, int64_t E,
                     int64_t e0) {
  const int64_t lanes = std::min<int64_t>(8, E - e0);
  const __m256i mask = first_lanes8(lanes);
  alignas(32) float tmp[N][8];
  __m256 a[N], s[N];
  channels_to_lanes<N>(A, lanes, e0, tmp);
  for (int n = 0; n < N; ++n) a[n] = _mm256_load_ps(tmp[n]);
  channels_to_lanes<N>(state_in, lanes, e0, tmp);
  for (int n = 0; n < N; ++n) s[n] = _mm256_load_ps(tmp[n]);
  const __m256 d = D ? _mm256_maskload_ps(D + e0, mask) : _mm256_setzero_ps();
  for (int64_t t = 0; t < T; ++t) {
    const __m256 dt = _mm256_maskload_ps(delta + t * E + e0, mask);
    const __m256 ut = _mm256_maskload_ps(u + t * E + e0, mask);
    const __m256 du = _mm256_mul_ps(dt, ut);
    __m256 out = _mm256_mul_ps(d, ut);
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      const __m256 decay = exp_nonpositive(_mm256_mul_ps(dt, a[n]));
      s[n] = _mm256_fmadd_ps(decay, s[n], _mm256_mul_ps(du, _mm256_set1_ps(Bm[t * N + n])));
      out = _mm256_fmadd_ps(s[n], _mm256_set1_ps(Cm[t * N + n]), out);
    }
    _mm256_maskstore_ps(y + t * E + e0, mask, out);
  }
  lanes_to_channels<N>(s, lanes, e0, state_out);
}

// dst[n] (+)= the sum of v[n]'s lanes, n < N (a multiple of 4)
template <int N>
inline void add_lane_sums(const __m256* v, float* dst, bool accumulate) {
  int n = 0;
  for (; n + 8 <= N; n += 8) {
    const __m256 sums = sum_each8(v + n);
    _mm256_storeu_ps(dst + n, accumulate ? _mm256_add_ps(_mm256_loadu_ps(dst + n), sums) : sums);
  }
  for (; n + 4 <= N; n += 4) {
    const __m128 sums = sum_each4(v + n);
    _mm_storeu_ps(dst + n, accumulate ? _mm_add_ps(_mm_loadu_ps(dst + n), sums) : sums);
  }
}

// The AVX-512 scan_backward_block on 8 lanes (hs holds (T + 1) x N x 8 floats); gB, gC are added to when
// ``accumulate`` (the second half of a block of 16 channels), else written.
template <int N>
void scan_backward_half_block(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                              const float* D, const float* state_in, const float* gy, const float* g_last, float* hs,
                              float* gu, float* gdelta, float* gB, float* gC, float* gA, float* gD, float* gstate,
                              int64_t T, int64_t E, int64_t e0, bool accumulate) {
  const int64_t lanes = std::min<int64_t>(8, E - e0);
  const __m256i mask = first_lanes8(lanes);
  alignas(32) float tmp[N][8];
  __m256 a[N], s[N], g[N], dA[N];
  channels_to_lanes<N>(A, lanes, e0, tmp);
  for (int n = 0; n < N; ++n) a[n] = _mm256_load_ps(tmp[n]);
  channels_to_lanes<N>(state_in, lanes, e0, tmp);
  for (int n = 0; n < N; ++n) s[n] = _mm256_load_ps(tmp[n]), _mm256_store_ps(hs + n * 8, s[n]);
  for (int64_t t = 0; t < T; ++t) {
    const __m256 dt = _mm256_maskload_ps(delta + t * E + e0, mask);
    const __m256 du = _mm256_mul_ps(dt, _mm256_maskload_ps(u + t * E + e0, mask));
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      s[n] = _mm256_fmadd_ps(exp_nonpositive(_mm256_mul_ps(dt, a[n])), s[n],
                             _mm256_mul_ps(du, _mm256_set1_ps(Bm[t * N + n])));
      _mm256_store_ps(hs + ((t + 1) * N + n) * 8, s[n]);
    }
  }
  channels_to_lanes<N>(g_last, lanes, e0, tmp);
  for (int n = 0; n < N; ++n) g[n] = _mm256_load_ps(tmp[n]), dA[n] = _mm256_setzero_ps();
  const __m256 d = D ? _mm256_maskload_ps(D + e0, mask) : _mm256_setzero_ps();
  __m256 dD = _mm256_setzero_ps();
  for (int64_t t = T - 1; t >= 0; --t) {
    const __m256 dt = _mm256_maskload_ps(delta + t * E + e0, mask);
    const __m256 ut = _mm256_maskload_ps(u + t * E + e0, mask);
    const __m256 gyt = _mm256_maskload_ps(gy + t * E + e0, mask);
    const __m256 du = _mm256_mul_ps(dt, ut);
    __m256 gBu = _mm256_setzero_ps(), gdt = _mm256_setzero_ps(), gc[N], gb[N];
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      const __m256 h = _mm256_load_ps(hs + ((t + 1) * N + n) * 8), h_prev = _mm256_load_ps(hs + (t * N + n) * 8);
      const __m256 decay = exp_nonpositive(_mm256_mul_ps(dt, a[n]));
      gc[n] = _mm256_mul_ps(gyt, h);
      g[n] = _mm256_fmadd_ps(gyt, _mm256_set1_ps(Cm[t * N + n]), g[n]);  // now g_t
      gb[n] = _mm256_mul_ps(g[n], du);
      gBu = _mm256_fmadd_ps(g[n], _mm256_set1_ps(Bm[t * N + n]), gBu);
      const __m256 ga = _mm256_mul_ps(_mm256_mul_ps(g[n], h_prev), decay);
      gdt = _mm256_fmadd_ps(ga, a[n], gdt);
      dA[n] = _mm256_fmadd_ps(ga, dt, dA[n]);
      g[n] = _mm256_mul_ps(g[n], decay);  // a_t g_t, the part of g_{t-1} that comes from s_t
    }
    add_lane_sums<N>(gc, gC + t * N, accumulate);
    add_lane_sums<N>(gb, gB + t * N, accumulate);
    _mm256_maskstore_ps(gu + t * E + e0, mask, _mm256_fmadd_ps(gBu, dt, _mm256_mul_ps(d, gyt)));
    _mm256_maskstore_ps(gdelta + t * E + e0, mask, _mm256_fmadd_ps(gBu, ut, gdt));
    dD = _mm256_fmadd_ps(gyt, ut, dD);
  }
  _mm256_maskstore_ps(gD + e0, mask, dD);
  lanes_to_channels<N>(dA, lanes, e0, gA);
  lanes_to_channels<N>(g, lanes, e0, gstate);
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

// The backward pass of one block of channels of one batch row: recompute the states forward (kept in `hs`,
// (T + 1) x N x 16 floats with the initial state first), then walk back with g_t = dL/ds_t:
//   g_t = gy_t C_t + a_{t+1} g_{t+1};  dC_t = sum_e gy_t s_t;  dB_t = sum_e g_t du_t;  du = sum_n g_t B_t dt + D gy_t
//   ddelta_t = sum_n g_t (s_{t-1} a_t A + B_t u_t);  dA += g_t s_{t-1} a_t dt;  dD += gy_t u_t;  dstate = a_0 g_0
// gB, gC are this block's partial sums over its channels (summed over blocks by the caller); gA, gD, gstate are
// this row's (summed over rows by the caller).
#if defined(__AVX512F__)
template <int N>
void scan_backward_block(const float* u, const float* delta, const float* A, const float* Bm, const float* Cm,
                         const float* D, const float* state_in, const float* gy, const float* g_last, float* hs,
                         float* gu, float* gdelta, float* gB, float* gC, float* gA, float* gD, float* gstate,
                         int64_t T, int64_t E, int64_t e0) {
  const int64_t lanes = std::min<int64_t>(16, E - e0);
  const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1);
  alignas(64) float tmp[N][16] = {};
  __m512 a[N], s[N], g[N], dA[N];
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) tmp[n][l] = A[(e0 + l) * N + n];
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) a[n] = _mm512_load_ps(tmp[n]);
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) tmp[n][l] = state_in ? state_in[(e0 + l) * N + n] : 0.f;
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) s[n] = _mm512_load_ps(tmp[n]), _mm512_store_ps(hs + n * 16, s[n]);
  for (int64_t t = 0; t < T; ++t) {
    const __m512 dt = _mm512_maskz_loadu_ps(mask, delta + t * E + e0);
    const __m512 du = _mm512_mul_ps(dt, _mm512_maskz_loadu_ps(mask, u + t * E + e0));
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      s[n] = _mm512_fmadd_ps(exp_nonpositive(_mm512_mul_ps(dt, a[n])), s[n],
                             _mm512_mul_ps(du, _mm512_set1_ps(Bm[t * N + n])));
      _mm512_store_ps(hs + ((t + 1) * N + n) * 16, s[n]);
    }
  }
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) tmp[n][l] = g_last ? g_last[(e0 + l) * N + n] : 0.f;
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) g[n] = _mm512_load_ps(tmp[n]), dA[n] = _mm512_setzero_ps();
  const __m512 d = D ? _mm512_maskz_loadu_ps(mask, D + e0) : _mm512_setzero_ps();
  __m512 dD = _mm512_setzero_ps();
  for (int64_t t = T - 1; t >= 0; --t) {
    const __m512 dt = _mm512_maskz_loadu_ps(mask, delta + t * E + e0);
    const __m512 ut = _mm512_maskz_loadu_ps(mask, u + t * E + e0);
    const __m512 gyt = _mm512_maskz_loadu_ps(mask, gy + t * E + e0);
    const __m512 du = _mm512_mul_ps(dt, ut);
    __m512 gBu = _mm512_setzero_ps(), gdt = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int n = 0; n < N; ++n) {
      const __m512 h = _mm512_load_ps(hs + ((t + 1) * N + n) * 16), h_prev = _mm512_load_ps(hs + (t * N + n) * 16);
      const __m512 decay = exp_nonpositive(_mm512_mul_ps(dt, a[n]));
      gC[t * N + n] = _mm512_reduce_add_ps(_mm512_mul_ps(gyt, h));
      g[n] = _mm512_fmadd_ps(gyt, _mm512_set1_ps(Cm[t * N + n]), g[n]);  // now g_t
      gB[t * N + n] = _mm512_reduce_add_ps(_mm512_mul_ps(g[n], du));
      gBu = _mm512_fmadd_ps(g[n], _mm512_set1_ps(Bm[t * N + n]), gBu);
      const __m512 ga = _mm512_mul_ps(_mm512_mul_ps(g[n], h_prev), decay);
      gdt = _mm512_fmadd_ps(ga, a[n], gdt);
      dA[n] = _mm512_fmadd_ps(ga, dt, dA[n]);
      g[n] = _mm512_mul_ps(g[n], decay);  // a_t g_t, the part of g_{t-1} that comes from s_t
    }
    _mm512_mask_storeu_ps(gu + t * E + e0, mask, _mm512_fmadd_ps(gBu, dt, _mm512_mul_ps(d, gyt)));
    _mm512_mask_storeu_ps(gdelta + t * E + e0, mask, _mm512_fmadd_ps(gBu, ut, gdt));
    dD = _mm512_fmadd_ps(gyt, ut, dD);
  }
  _mm512_mask_storeu_ps(gD + e0, mask, dD);
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) _mm512_store_ps(tmp[n], dA[n]);
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) gA[(e0 + l) * N + n] = tmp[n][l];
#pragma GCC unroll 16
  for (int n = 0; n < N; ++n) _mm512_store_ps(tmp[n], g[n]);
  for (int64_t l = 0; l < lanes; ++l)
    for (int n = 0; n < N; ++n) gstate[(e0 + l) * N + n] = tmp[n][l];
}
#endif

// Any N, no SIMD: the same backward pass channel by channel (hs holds (T + 1) x N floats).
void scan_backward_block_generic(const float* u, const float* delta, const float* A, const float* Bm,
                                 const float* Cm, const float* D, const float* state_in, const float* gy,
                                 const float* g_last, float* hs, float* gu, float* gdelta, float* gB, float* gC,
                                 float* gA, float* gD, float* gstate, int64_t T, int64_t E, int64_t N, int64_t e0) {
  const int64_t stop = std::min<int64_t>(e0 + 16, E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) gB[t * N + n] = gC[t * N + n] = 0.f;
  for (int64_t e = e0; e < stop; ++e) {
    const float* Ae = A + e * N;
    for (int64_t n = 0; n < N; ++n) hs[n] = state_in ? state_in[e * N + n] : 0.f;
    for (int64_t t = 0; t < T; ++t) {
      const float dt = delta[t * E + e], du = dt * u[t * E + e];
      for (int64_t n = 0; n < N; ++n)
        hs[(t + 1) * N + n] = std::exp(dt * Ae[n]) * hs[t * N + n] + du * Bm[t * N + n];
    }
    float g[64], dA[64] = {}, dD = 0.f;
    for (int64_t n = 0; n < N; ++n) g[n] = g_last ? g_last[e * N + n] : 0.f;
    for (int64_t t = T - 1; t >= 0; --t) {
      const float dt = delta[t * E + e], ut = u[t * E + e], gyt = gy[t * E + e], du = dt * ut;
      float gBu = 0.f, gdt = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float decay = std::exp(dt * Ae[n]), h_prev = hs[t * N + n];
        gC[t * N + n] += gyt * hs[(t + 1) * N + n];
        g[n] += gyt * Cm[t * N + n];
        gB[t * N + n] += g[n] * du;
        gBu += g[n] * Bm[t * N + n];
        const float ga = g[n] * h_prev * decay;
        gdt += ga * Ae[n];
        dA[n] += ga * dt;
        g[n] *= decay;
      }
      gu[t * E + e] = gBu * dt + (D ? D[e] : 0.f) * gyt;
      gdelta[t * E + e] = gBu * ut + gdt;
      dD += gyt * ut;
    }
    gD[e] = dD;
    for (int64_t n = 0; n < N; ++n) gA[e * N + n] = dA[n], gstate[e * N + n] = g[n];
  }
}

void check_scan_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& Bm,
                       const at::Tensor& Cm, const c10::optional<at::Tensor>& D,
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
}

}  // namespace

std::vector<at::Tensor> selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                       const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D,
                                       const c10::optional<at::Tensor>& state) {
  check_scan_inputs(u, delta, A, Bm, Cm, D, state);
  const int64_t batch = u.size(0), T = u.size(1), E = u.size(2), N = A.size(1);
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
#elif defined(PHI4FLASH_SIMD_AVX2)
#define PHI4FLASH_SCAN_HALVES(NN)                                                                      \
  if (N == NN) {                                                                                       \
    scan_half_block<NN>(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, e0);                              \
    if (e0 + 8 < E) scan_half_block<NN>(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, e0 + 8);          \
    continue;                                                                                          \
  }
      PHI4FLASH_SCAN_HALVES(16)
      PHI4FLASH_SCAN_HALVES(8)
      PHI4FLASH_SCAN_HALVES(4)
#undef PHI4FLASH_SCAN_HALVES
#endif
      scan_block_generic(up, dp, Ap, Bp, Cp, Dp, sin, sout, yp, T, E, N, e0);
    }
  });
  return {y, last};
}


std::vector<at::Tensor> selective_scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                const at::Tensor& Bm, const at::Tensor& Cm,
                                                const c10::optional<at::Tensor>& D,
                                                const c10::optional<at::Tensor>& state, const at::Tensor& gy,
                                                const c10::optional<at::Tensor>& g_last) {
  check_scan_inputs(u, delta, A, Bm, Cm, D, state);
  TORCH_CHECK(gy.scalar_type() == at::kFloat && gy.is_contiguous() && gy.sizes() == u.sizes(),
              "gy: contiguous float32 shaped like u (B, T, E)");
  if (g_last.has_value())
    TORCH_CHECK(g_last->scalar_type() == at::kFloat && g_last->is_contiguous() && g_last->dim() == 3 &&
                    g_last->size(0) == u.size(0) && g_last->size(1) == u.size(2) && g_last->size(2) == A.size(1),
                "g_last: contiguous float32 (B, E, N)");
  const int64_t batch = u.size(0), T = u.size(1), E = u.size(2), N = A.size(1);
  const int64_t blocks = (E + 15) / 16;
  auto gu = at::empty_like(u), gdelta = at::empty_like(u);
  auto gB_parts = at::empty({blocks, batch, T, N}, u.options()), gC_parts = at::empty_like(gB_parts);
  auto gA_rows = at::empty({batch, E, N}, u.options()), gD_rows = at::empty({batch, E}, u.options());
  auto gstate = at::empty({batch, E, N}, u.options());
  const float* Dp = D.has_value() ? D->data_ptr<float>() : nullptr;
  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hs_buffer((T + 1) * N * 16 + 16);
    float* hs = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(hs_buffer.data()) + 63) & ~uintptr_t(63));
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / blocks, block = job % blocks, e0 = block * 16;
      const float* up = u.data_ptr<float>() + b * T * E;
      const float* dp = delta.data_ptr<float>() + b * T * E;
      const float* gyp = gy.data_ptr<float>() + b * T * E;
      const float* Bp = Bm.data_ptr<float>() + b * T * N;
      const float* Cp = Cm.data_ptr<float>() + b * T * N;
      const float* sin = state.has_value() ? state->data_ptr<float>() + b * E * N : nullptr;
      const float* glp = g_last.has_value() ? g_last->data_ptr<float>() + b * E * N : nullptr;
      float* gBp = gB_parts.data_ptr<float>() + (block * batch + b) * T * N;
      float* gCp = gC_parts.data_ptr<float>() + (block * batch + b) * T * N;
      float* gup = gu.data_ptr<float>() + b * T * E;
      float* gdp = gdelta.data_ptr<float>() + b * T * E;
      float* gAp = gA_rows.data_ptr<float>() + b * E * N;
      float* gDp = gD_rows.data_ptr<float>() + b * E;
      float* gsp = gstate.data_ptr<float>() + b * E * N;
      const float* Ap = A.data_ptr<float>();
#if defined(__AVX512F__)
#define PHI4FLASH_SCAN_BACKWARD(NN)                                                                             \
  if (N == NN) {                                                                                                \
    scan_backward_block<NN>(up, dp, Ap, Bp, Cp, Dp, sin, gyp, glp, hs, gup, gdp, gBp, gCp, gAp, gDp, gsp, T, E, \
                            e0);                                                                                \
    continue;                                                                                                   \
  }
      PHI4FLASH_SCAN_BACKWARD(16)
      PHI4FLASH_SCAN_BACKWARD(8)
      PHI4FLASH_SCAN_BACKWARD(4)
#undef PHI4FLASH_SCAN_BACKWARD
#elif defined(PHI4FLASH_SIMD_AVX2)
#define PHI4FLASH_SCAN_BACKWARD_HALVES(NN)                                                                       \
  if (N == NN) {                                                                                                 \
    for (int64_t half = e0; half < std::min<int64_t>(e0 + 16, E); half += 8)                                    \
      scan_backward_half_block<NN>(up, dp, Ap, Bp, Cp, Dp, sin, gyp, glp, hs, gup, gdp, gBp, gCp, gAp, gDp, gsp, \
                                   T, E, half, half != e0);                                                      \
    continue;                                                                                                    \
  }
      PHI4FLASH_SCAN_BACKWARD_HALVES(16)
      PHI4FLASH_SCAN_BACKWARD_HALVES(8)
      PHI4FLASH_SCAN_BACKWARD_HALVES(4)
#undef PHI4FLASH_SCAN_BACKWARD_HALVES
#endif
      scan_backward_block_generic(up, dp, Ap, Bp, Cp, Dp, sin, gyp, glp, hs, gup, gdp, gBp, gCp, gAp, gDp, gsp, T,
                                  E, N, e0);
    }
  });
  return {gu, gdelta, gA_rows.sum(0), gB_parts.sum(0), gC_parts.sum(0), gD_rows.sum(0), gstate};
}

}  // namespace phi4flash
