// phi4flash's C++ CPU kernels (built by phi4flash/native.py); each function is documented where it is defined.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace phi4flash {

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

}  // namespace phi4flash
