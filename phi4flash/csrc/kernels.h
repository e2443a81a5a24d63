// phi4flash's C++ CPU kernels (built by phi4flash/native.py); each function is documented where it is defined.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <string>
#include <vector>

namespace phi4flash {

// x as a tensor of dtype T holds it (bfloat16: rounded to nearest even), in float32: the kernels that match the
// model's PyTorch operations round their intermediates with it where those operations do
template <typename T>
inline float held(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// SiLU in float32 (x sigmoid(x)); the vector kernels' 8-lane silu8 (simd.h) agrees with it to float32 rounding
inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// quant_cpu.cpp: weight-only quantized linears in row tiles (int8 activations), bfloat16 matrix-vector products
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t group);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales);
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w);
at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                      int64_t group, const c10::optional<at::Tensor>& rows);
void dequantize_into(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                     int64_t group, int64_t first_row, at::Tensor out);
std::string isa();

// scan_cpu.cpp: the Mamba-1 selective scan
std::vector<at::Tensor> selective_scan(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                       const at::Tensor& Bm, const at::Tensor& Cm, const c10::optional<at::Tensor>& D,
                                       const c10::optional<at::Tensor>& state);
// its gradients (gu, gdelta, gA, gB, gC, gD, gstate) from gy (B, T, E) and g_last (B, E, N), for training
std::vector<at::Tensor> selective_scan_backward(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                                const at::Tensor& Bm, const at::Tensor& Cm,
                                                const c10::optional<at::Tensor>& D,
                                                const c10::optional<at::Tensor>& state, const at::Tensor& gy,
                                                const c10::optional<at::Tensor>& g_last);

// mamba_step_cpu.cpp: the Mamba mixer's one-token decode step, around its projections: the convolution (its state shifted in place),
// then the scan (softplus of the step sizes, the state updated in place) and the SiLU(z) gate
at::Tensor conv_step(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                     at::Tensor state);
std::vector<at::Tensor> scan_step(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& dt_bias,
                                  const at::Tensor& A_log, const at::Tensor& Bm, const at::Tensor& Cm,
                                  const c10::optional<at::Tensor>& D, const at::Tensor& z, at::Tensor state,
                                  bool emits_memory);

// attention_cpu.cpp: differential attention of one new token per row against the K/V cache, read in place
at::Tensor diff_attention_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& key_valid, double scale);
// the same with the differential combination done: (B, H Dh), as the layer's output projection takes it
at::Tensor diff_attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& key_valid, double scale, const at::Tensor& lam,
                               const at::Tensor& subln_weight, double lambda_init, double eps);

// layer_cpu.cpp: the decoder layer's residual add with its LayerNorm, and the MLP's and GMU's SiLU product
// [x + delta (empty when delta is None: the sum is x), LayerNorm of the sum in the weight's dtype]
std::vector<at::Tensor> add_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& delta,
                                       const at::Tensor& weight, const c10::optional<at::Tensor>& bias, double eps);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);

}  // namespace phi4flash
