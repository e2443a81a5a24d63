// The Python module of phi4flash's C++ CPU kernels.
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_linear", &phi4flash::int4_linear, "x (M, K) bf16 @ int4 weight^T -> (M, N) bf16");
  m.def("int8_linear", &phi4flash::int8_linear, "x (M, K) bf16 @ int8 weight^T -> (M, N) bf16");
  m.def("bf16_linear", &phi4flash::bf16_linear, "x (M, K) bf16 @ bf16 weight^T -> (M, N) bf16");
  m.def("dequantize", &phi4flash::dequantize, "weight rows -> (R, K) bf16", py::arg("w"), py::arg("scales"),
        py::arg("zeros") = py::none(), py::arg("group") = 0, py::arg("rows") = py::none());
  m.def("selective_scan", &phi4flash::selective_scan, "the Mamba-1 selective scan -> (y, last state)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D") = py::none(),
        py::arg("state") = py::none());
  m.def("isa", &phi4flash::isa, "the instruction set the kernels were built for");
}
