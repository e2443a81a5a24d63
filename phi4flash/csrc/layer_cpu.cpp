// The decoder layer's small operations around its mixer and MLP, one pass each on the CPU:
//
//   add_layer_norm: sum = x + delta (delta as x's dtype holds it);  normed = LayerNorm(sum as the weight's dtype)
//   silu_mul:       out = SiLU(gate) up
//
// In PyTorch each is three to five operations (casts, the add, the norm; SiLU, the product), and at decode's one
// row their dispatch costs more than their arithmetic: a real-size decode step runs 65 LayerNorms and 39 SiLU
// products (32 MLPs, 7 GMUs). The roundings are the model's (DecoderLayer.forward, MLP.forward,
// GatedMemoryUnit.forward): float32 arithmetic, each PyTorch operation's result rounded to its dtype. The
// LayerNorm's mean and variance are summed in another order than PyTorch's, so a normed value may differ from
// PyTorch's in its last bit.

#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace phi4flash {
namespace {

constexpr int64_t kValuesPerJob = 1 << 16;  // below this much work a call runs on one thread
// SiLU products: blocks of 1,024 values (a multiple of the vectors' 8), at least 4 blocks a thread: decode's one
// row of 10,240 bfloat16 values took 13 us a call in 2 threads, 19 in one (AVX2 EPYC)
constexpr int64_t kSiluBlock = 1024, kSiluBlocksPerJob = 4;

// a float32 or bfloat16 tensor's data as a typed pointer, handed to f
template <typename F>
void with_data(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat)
    f(t.data_ptr<float>());
  else
    f(t.data_ptr<at::BFloat16>());
}

float sum_of(const float* v, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 lanes = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) lanes = _mm256_add_ps(lanes, _mm256_loadu_ps(v + i));
  total = reduce_add8(lanes);
#endif
  for (; i < n; ++i) total += v[i];
  return total;
}

float squared_deviations(const float* v, float mean, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 m = _mm256_set1_ps(mean);
  __m256 lanes = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(v + i), m);
    lanes = _mm256_fmadd_ps(d, d, lanes);
  }
  total = reduce_add8(lanes);
#endif
  for (; i < n; ++i) total += (v[i] - mean) * (v[i] - mean);
  return total;
}

// one row: X the residual's dtype, Dl delta's, W the norm's (weight, bias, normed); values: D floats of scratch
template <typename X, typename Dl, typename W>
void add_norm_row(const X* x, const Dl* delta, const W* weight, const W* bias, float eps, int64_t D, X* sum,
                  W* normed, float* values) {
  for (int64_t d = 0; d < D; ++d) {
    const float s = delta ? held<X>(static_cast<float>(x[d]) + held<X>(static_cast<float>(delta[d])))
                          : static_cast<float>(x[d]);
    if (sum) sum[d] = static_cast<X>(s);
    values[d] = held<W>(s);
  }
  const float mean = sum_of(values, D) / static_cast<float>(D);
  const float rstd = 1.f / std::sqrt(squared_deviations(values, mean, D) / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) {
    const float y = (values[d] - mean) * rstd * static_cast<float>(weight[d]);
    normed[d] = static_cast<W>(bias ? y + static_cast<float>(bias[d]) : y);
  }
}

// n values of one row: out = SiLU(gate) up, SiLU's result rounded to T first as F.silu's is
template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_mul_ps(silu8(_mm256_loadu_ps(gate + i)), _mm256_loadu_ps(up + i)));
  } else {
    for (; i + 8 <= n; i += 8)
      store_bf16x8(out + i, _mm256_mul_ps(held_bf16x8(silu8(load_bf16x8(gate + i))), load_bf16x8(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<T>(held<T>(silu(static_cast<float>(gate[i]))) * static_cast<float>(up[i]));
}

bool float_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

}  // namespace

std::vector<at::Tensor> add_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps) {
  const int64_t D = weight.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == D, "add_layer_norm: x (..., D) with D the weight's length");
  TORCH_CHECK(float_or_bf16(x) && float_or_bf16(weight), "add_layer_norm: float32 or bfloat16 x and weight");
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous(), "add_layer_norm: a contiguous (D,) weight");
  if (bias.has_value())
    TORCH_CHECK(bias->sizes() == weight.sizes() && bias->scalar_type() == weight.scalar_type() &&
                    bias->is_contiguous(),
                "add_layer_norm: the bias as the weight (shape, dtype, contiguous)");
  if (delta.has_value())
    TORCH_CHECK(delta->sizes() == x.sizes() && float_or_bf16(*delta),
                "add_layer_norm: delta of x's shape, float32 or bfloat16");
  const at::Tensor xs = x.contiguous();
  const at::Tensor ds = delta.has_value() ? delta->contiguous() : at::Tensor();
  const int64_t rows = xs.numel() / D;
  at::Tensor sum = delta.has_value() ? at::empty_like(xs) : at::empty({0}, x.options());  // no alias of x
  at::Tensor normed = at::empty(x.sizes(), x.options().dtype(weight.scalar_type()));
  with_data(xs, [&](auto* xp) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    with_data(weight, [&](auto* wp) {
      using W = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
      const W* bp = bias.has_value() ? bias->data_ptr<W>() : nullptr;
      X* sp = delta.has_value() ? sum.data_ptr<X>() : nullptr;
      W* np = normed.data_ptr<W>();
      const auto run = [&](const auto* dp) {
        at::parallel_for(0, rows, std::max<int64_t>(1, kValuesPerJob / D), [&](int64_t r0, int64_t r1) {
          std::vector<float> values(D);
          for (int64_t r = r0; r < r1; ++r)
            add_norm_row(xp + r * D, dp ? dp + r * D : dp, wp, bp, static_cast<float>(eps), D,
                         sp ? sp + r * D : sp, np + r * D, values.data());
        });
      };
      if (!delta.has_value())
        run(static_cast<const X*>(nullptr));
      else
        with_data(ds, [&](auto* dp) { run(dp); });
    });
  });
  return {sum, normed};
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && float_or_bf16(gate),
              "silu_mul: gate and up of one shape, both float32 or both bfloat16");
  TORCH_CHECK(gate.dim() >= 1 && gate.stride(-1) == 1 && up.stride(-1) == 1,
              "silu_mul: each row's values contiguous");
  const int64_t n = gate.size(-1);
  const at::Tensor g = gate.reshape({-1, n}), u = up.reshape({-1, n});  // views where the rows allow
  const int64_t rows = g.size(0);
  at::Tensor out = at::empty({rows, n}, gate.options());
  // work in blocks of a row's values, so that decode's single row (10,240 values) is shared between threads too
  const int64_t blocks_per_row = (n + kSiluBlock - 1) / kSiluBlock;
  with_data(g, [&](auto* gp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(gp)>>;
    const T* upp = u.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t g_row = g.stride(0), u_row = u.stride(0);
    at::parallel_for(0, rows * blocks_per_row, kSiluBlocksPerJob, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = i / blocks_per_row, c = (i % blocks_per_row) * kSiluBlock;
        silu_mul_row(gp + r * g_row + c, upp + r * u_row + c, op + r * n + c, std::min(kSiluBlock, n - c));
      }
    });
  });
  return out.view(gate.sizes());
}

}  // namespace phi4flash
