// phi4flash's C++ CPU kernels as PyTorch operators (torch.ops.phi4flash.*: dispatched without Python overhead and
// opaque to torch.compile, which needs only their fake versions, in phi4flash/native.py), plus a Python module.
#include "kernels.h"

#include <torch/library.h>

TORCH_LIBRARY(phi4flash, m) {
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales, Tensor zeros, int group) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("dequantize(Tensor w, Tensor scales, Tensor? zeros, int group, Tensor? rows) -> Tensor");
  m.def("dequantize_into(Tensor w, Tensor scales, Tensor? zeros, int group, int first_row, Tensor(a!) out) -> ()");
  m.def("selective_scan(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? state) "
        "-> (Tensor, Tensor)");
  m.def("selective_scan_backward(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? state, "
        "Tensor gy, Tensor? g_last) -> Tensor[]");
  m.def("conv_step(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) state) -> Tensor");
  m.def("scan_step(Tensor u, Tensor dt, Tensor dt_bias, Tensor A_log, Tensor B, Tensor C, Tensor? D, Tensor z, "
        "Tensor(a!) state, bool emits_memory) -> Tensor[]");
  m.def("diff_attention_decode(Tensor q, Tensor k, Tensor v, Tensor? key_valid, float scale) -> Tensor");
  m.def("diff_attention_step(Tensor q, Tensor k, Tensor v, Tensor? key_valid, float scale, Tensor lam, "
        "Tensor subln_weight, float lambda_init, float eps) -> Tensor");
}

static std::tuple<at::Tensor, at::Tensor> selective_scan_op(const at::Tensor& u, const at::Tensor& delta,
                                                            const at::Tensor& A, const at::Tensor& B,
                                                            const at::Tensor& C, const c10::optional<at::Tensor>& D,
                                                            const c10::optional<at::Tensor>& state) {
  auto out = phi4flash::selective_scan(u, delta, A, B, C, D, state);
  return {out[0], out[1]};
}

TORCH_LIBRARY_IMPL(phi4flash, CPU, m) {
  m.impl("int4_linear", &phi4flash::int4_linear);
  m.impl("int8_linear", &phi4flash::int8_linear);
  m.impl("bf16_linear", &phi4flash::bf16_linear);
  m.impl("dequantize", &phi4flash::dequantize);
  m.impl("dequantize_into", &phi4flash::dequantize_into);
  m.impl("selective_scan", &selective_scan_op);
  m.impl("selective_scan_backward", &phi4flash::selective_scan_backward);
  m.impl("conv_step", &phi4flash::conv_step);
  m.impl("scan_step", &phi4flash::scan_step);
  m.impl("diff_attention_decode", &phi4flash::diff_attention_decode);
  m.impl("diff_attention_step", &phi4flash::diff_attention_step);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &phi4flash::isa, "the instruction set the kernels were built for");
  // Eager-only functions (ops.add_layer_norm, ops.silu_mul; decode calls them a hundred times a token), called here
  // without the dispatcher: about 3 us a call against 7 as torch.ops operators. torch.compile never sees them.
  m.def("add_layer_norm", &phi4flash::add_layer_norm,
        "[x + delta (empty when delta is None: the sum is x), LayerNorm of the sum in the weight's dtype]");
  m.def("silu_mul", &phi4flash::silu_mul, "SiLU(gate) up, SiLU's result rounded to the dtype first");
}
