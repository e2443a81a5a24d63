"""Weight-only int8 / int4 quantization of the linear layers, and quantize-while-loading.

One place for quantization: ``model.py`` has no quantization branches. A :class:`QuantizedLinear` is a
drop-in module for ``nn.Linear`` (same call, same output dtype as its input), and a
:class:`QuantizedEmbedding` looks rows up in the same quantized table the LM head multiplies by, so the
tied 200064 x 2560 table is stored once.

Formats (``QuantSpec``):

- **int8**: symmetric, one scale per output channel: w ~ q * s, q in [-127, 127].
- **int4**: asymmetric, one scale and zero per group of ``group_size`` inputs: w ~ (q - 8) * s + z,
  q in [0, 15] (the convention of PyTorch's int4 kernels, whose zero is the value at q = 8).

What is quantized: every ``nn.Linear`` and the tied embedding / LM head, except Mamba's ``dt_proj``
(0.2% of the weights: its 160-wide input is not a multiple of the int4 group, and its bias is added in
float32 before the softplus, as the official kernel does). A layer whose shape the int4 kernel cannot
take (out_features not a multiple of 16, or in_features not a multiple of the group) is stored int8
instead; the rule depends on shapes only, so a checkpoint's expected tensors follow from its config.
Mamba's A_log and D, the lambdas, the norms, biases and conv weights stay as they are.

On disk (``phi4flash quantize``), a quantized linear ``P`` is stored portably as ``P.qweight`` (int8
(N, K), or uint8 (N, K/2) with the even input in the low nibble), ``P.scales`` and, for int4,
``P.zeros`` ((N, K/g), bfloat16); config.json carries a ``quantization`` entry. In memory the weights
are repacked once, at load, into the layout of the kernel that runs them (:mod:`phi4flash.qkernels`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import qkernels

logger = logging.getLogger(__name__)

QUANT_METHOD = "phi4flash-weight-only"
SCALE_DTYPE = torch.bfloat16  # scales and zeros on disk and in the kernels
INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
# Modules kept in the model dtype (see the module docstring).
UNQUANTIZED_LINEARS = ("dt_proj",)
_ROWS_PER_CHUNK = 4096  # rows quantized at a time: bounds the float32 working copy (40 MB at width 2560)


class QuantizationError(ValueError):
    """A quantization request or a checkpoint's ``quantization`` entry that phi4flash cannot honour."""


@dataclass(frozen=True)
class QuantSpec:
    """Which weight-only format: ``bits`` 8 (per output channel) or 4 (groups of ``group_size`` inputs)."""

    bits: int
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.bits == 8 and self.group_size != 0:
            raise QuantizationError(f"int8 uses one scale per output channel; got group_size={self.group_size}")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(f"int4 group_size must be one of {INT4_GROUP_SIZES}; got {self.group_size}")
        if self.bits not in (4, 8):
            raise QuantizationError(f"bits must be 8 or 4; got {self.bits}")

    @classmethod
    def parse(cls, value: str | QuantSpec | None, group_size: int | None = None) -> QuantSpec | None:
        """``"int8"``, ``"int4"``, ``"int4-g64"`` (or a spec, or None) -> a spec; raises on anything else."""
        if value is None or isinstance(value, QuantSpec):
            return value
        text = str(value).strip().lower()
        if text in ("none", "", "no", "off"):
            return None
        bits_text, _, group_text = text.partition("-g")
        bits = {"int8": 8, "int4": 4}.get(bits_text)
        if bits is None or (group_text and not group_text.isdigit()):
            raise QuantizationError(f"unknown quantization {value!r}; use 'int8', 'int4' or 'int4-g<group size>' "
                                    f"with a group size in {INT4_GROUP_SIZES} (e.g. 'int4-g64')")
        if bits == 8:
            if group_text or group_size:
                raise QuantizationError("int8 has one scale per output channel and takes no group size")
            return cls(8)
        return cls(4, int(group_text) if group_text else group_size or DEFAULT_GROUP_SIZE)

    @property
    def name(self) -> str:
        """The spec as :meth:`parse` reads it: ``int8`` or ``int4-g128``."""
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    @property
    def label(self) -> str:
        """For people: ``int8`` or ``int4 (g128)``."""
        return "int8" if self.bits == 8 else f"int4 (g{self.group_size})"

    def bits_for(self, out_features: int, in_features: int) -> int:
        """4 where the int4 kernels take this shape, else 8 (see the module docstring)."""
        if self.bits == 4 and out_features % 16 == 0 and in_features % self.group_size == 0:
            return 4
        return 8

    def to_config(self) -> dict[str, Any]:
        """The ``quantization`` entry of config.json."""
        entry: dict[str, Any] = {"method": QUANT_METHOD, "bits": self.bits}
        if self.bits == 4:
            entry["group_size"] = self.group_size
        entry["scale_dtype"] = str(SCALE_DTYPE).replace("torch.", "")
        entry["unquantized"] = list(UNQUANTIZED_LINEARS)
        return entry

    @classmethod
    def from_config(cls, entry: Any) -> QuantSpec:
        """Read and check config.json's ``quantization`` entry; every problem is listed in one error."""
        if not isinstance(entry, dict):
            raise QuantizationError(f"config.json 'quantization' must be an object, got {entry!r}")
        expected_keys = {"method", "bits", "group_size", "scale_dtype", "unquantized"}
        problems = [f"unknown key {key!r}" for key in sorted(set(entry) - expected_keys)]
        if entry.get("method") != QUANT_METHOD:
            problems.append(f"method is {entry.get('method')!r}, expected {QUANT_METHOD!r}")
        bits = entry.get("bits")
        if bits not in (4, 8):
            problems.append(f"bits is {bits!r}, expected 8 or 4")
        group = entry.get("group_size", 0)
        if bits == 4 and group not in INT4_GROUP_SIZES:
            problems.append(f"group_size is {group!r}, expected one of {INT4_GROUP_SIZES}")
        if bits == 8 and group not in (0, None):
            problems.append(f"group_size is {group!r}; int8 has none")
        if entry.get("scale_dtype", "bfloat16") != "bfloat16":
            problems.append(f"scale_dtype is {entry.get('scale_dtype')!r}, expected 'bfloat16'")
        if list(entry.get("unquantized", UNQUANTIZED_LINEARS)) != list(UNQUANTIZED_LINEARS):
            problems.append(f"unquantized is {entry.get('unquantized')!r}, expected {list(UNQUANTIZED_LINEARS)}")
        if problems:
            raise QuantizationError("config.json 'quantization' entry is not one phi4flash wrote:\n"
                                    + "\n".join(f"  {p}" for p in problems)
                                    + "\nfix: re-create the folder with `phi4flash quantize SOURCE OUT --bits 4`")
        return cls(bits, group if bits == 4 else 0)


# -- quantize / dequantize (portable format) ---------------------------------------------------------------------


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> q int8 (N, K), scales (N,) bfloat16, with w ~ q * s.

    The scale is rounded to bfloat16 first and q computed against the rounded scale, so that the
    stored pair reconstructs as well as the stored scale allows.
    """
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> packed uint8 (N, K/2), scales and zeros (N, K/g) bfloat16.

    Per group of ``group_size`` inputs: s = (max - min) / 15, z = min + 8 s (the value at q = 8), both
    rounded to bfloat16, then q = round((w - z) / s) + 8 in [0, 15]. Input 2j goes to the low nibble of
    byte j, input 2j + 1 to the high nibble.
    """
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
    zero = (low + 8 * scale.float()).to(SCALE_DTYPE)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.uint8).view(n, k)
    return pack_nibbles(q), scale, zero


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values in [0, 15] -> (N, K/2) uint8: input 2j in the low nibble, 2j + 1 in the high."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (N, K/2) uint8 -> (N, K) uint8 values in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


@torch.no_grad()
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Portable quantized tensors -> the (N, K) weight they stand for (the reference for every kernel)."""
    if zeros is None:
        return (qweight.to(torch.float32) * scales.float()[:, None]).to(dtype)
    q = unpack_nibbles(qweight).to(torch.float32)
    n, k = q.shape
    groups = scales.shape[1]
    q = q.view(n, groups, k // groups)
    return ((q - 8) * scales.float()[..., None] + zeros.float()[..., None]).view(n, k).to(dtype)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """One (N, K) weight -> its portable tensors {"qweight", "scales"[, "zeros"]}, ``_ROWS_PER_CHUNK`` rows
    at a time so that the float32 working copy stays small (the 200064-row embedding included)."""
    parts: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = weight[start:start + _ROWS_PER_CHUNK]
        parts.append(quantize_int8(rows) if bits == 8 else quantize_int4(rows, group_size))
    names = ("qweight", "scales") if bits == 8 else ("qweight", "scales", "zeros")
    return {name: torch.cat([p[i] for p in parts]) for i, name in enumerate(names)}


def quantized_shapes(out_features: int, in_features: int, bits: int,
                     group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The portable tensors of one quantized linear: suffix -> (shape, dtype)."""
    if bits == 8:
        return {"qweight": ((out_features, in_features), torch.int8), "scales": ((out_features,), SCALE_DTYPE)}
    groups = in_features // group_size
    return {"qweight": ((out_features, in_features // 2), torch.uint8),
            "scales": ((out_features, groups), SCALE_DTYPE), "zeros": ((out_features, groups), SCALE_DTYPE)}


# -- modules ------------------------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A weight-only quantized ``nn.Linear``: y = x W^T + b with W held as int8 or int4.

    Built empty (on any device, meta included) and filled once with :meth:`set_weight` (a float weight,
    quantized here) or :meth:`set_quantized` (portable tensors from a quantized checkpoint). The
    packed weight lives in the layout of the kernel that runs it (:mod:`phi4flash.qkernels`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else 0
        self.bias = nn.Parameter(torch.empty(out_features, device="meta"), requires_grad=False) if bias else None
        self.packed: qkernels.PackedWeight | None = None

    @classmethod
    def like(cls, linear: nn.Linear, spec: QuantSpec) -> QuantizedLinear:
        """An empty quantized stand-in for ``linear`` under ``spec``."""
        out_features, in_features = linear.weight.shape
        bits = spec.bits_for(out_features, in_features)
        return cls(in_features, out_features, linear.bias is not None, bits, spec.group_size if bits == 4 else 0)

    @property
    def label(self) -> str:
        """``int8`` or ``int4 (g128)``."""
        return "int8" if self.bits == 8 else f"int4 (g{self.group_size})"

    def set_weight(self, weight: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
        """Quantize a float (N, K) weight (on CPU, chunk by chunk) and pack it for ``device``."""
        self.set_quantized(quantize_weight(weight, self.bits, self.group_size), device=device, dtype=dtype)

    def set_quantized(self, tensors: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype) -> None:
        """Pack portable tensors (``qweight``, ``scales``[, ``zeros``]) for ``device``, activations in ``dtype``."""
        self.packed = qkernels.pack(tensors, self.bits, self.group_size, self.out_features, self.in_features,
                                    device=device, dtype=dtype)

    def portable(self) -> dict[str, torch.Tensor]:
        """The weight as portable CPU tensors (what :meth:`set_quantized` takes and checkpoints store)."""
        return self._filled().portable()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (N, K) weight this layer multiplies by, in ``dtype`` (default: the activation dtype)."""
        packed = self._filled()
        return packed.dequantize(dtype or packed.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any shape) of the weight, dequantized: index.shape + (K,) (an embedding lookup)."""
        return self._filled().rows(index)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight with its scales (and zeros)."""
        return self._filled().nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., K) -> (..., N) in the activation dtype the layer was packed for."""
        packed = self._filled()
        x2 = x.reshape(-1, self.in_features).to(packed.dtype).contiguous()  # the kernels need dense rows
        y = packed.matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def _filled(self) -> qkernels.PackedWeight:
        if self.packed is None:
            raise RuntimeError("this QuantizedLinear has no weight yet: fill it with set_weight or set_quantized")
        return self.packed

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedLinear:
        # The packed weight is not a buffer (its layout belongs to one device's kernel), so .to() cannot
        # move it: refuse a move or cast instead of leaving the weight behind.
        if self.packed is not None:
            probe = torch.empty(0, device=self.packed.device, dtype=self.packed.dtype)
            moved = fn(probe)
            if moved.device != probe.device or moved.dtype != probe.dtype:
                raise RuntimeError(f"a quantized model is packed for {probe.device} with {probe.dtype} activations "
                                   "and cannot be moved or cast; load it again with device=... / dtype=...")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.label}")


class QuantizedEmbedding(nn.Module):
    """Embedding lookup in a :class:`QuantizedLinear`'s table (the tied LM head's), rows dequantized."""

    def __init__(self, table: QuantizedLinear, owns_table: bool) -> None:
        super().__init__()
        if owns_table:
            self.table = table
        else:  # the tied LM head owns it; keep a plain reference so its buffers are not listed twice
            object.__setattr__(self, "table", table)
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(...) ids -> (..., D) in the activation dtype."""
        return self.table.rows(input_ids)


# -- model surgery ------------------------------------------------------------------------------------------------


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every ``nn.Linear`` that gets quantized, the LM head excluded (it is the table)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head" and name.rsplit(".", 1)[-1] not in UNQUANTIZED_LINEARS:
            yield name, module


def quantize_modules_(model: nn.Module, spec: QuantSpec) -> dict[str, QuantizedLinear]:
    """Swap every quantizable linear of a (meta) Phi4FlashForCausalLM for an empty :class:`QuantizedLinear`.

    Returns checkpoint prefix -> module to fill: ``model.layers.N....`` for the linears, and
    ``model.embed_tokens`` (plus ``lm_head`` when untied) for the table(s).
    """
    targets: dict[str, QuantizedLinear] = {}
    for name, linear in list(quantizable_linears(model)):
        module = QuantizedLinear.like(linear, spec)
        model.set_submodule(name, module)
        targets[name] = module
    embedding: nn.Embedding = model.model.embed_tokens  # type: ignore[assignment]
    vocab, hidden = embedding.weight.shape
    bits = spec.bits_for(vocab, hidden)
    table = QuantizedLinear(hidden, vocab, False, bits, spec.group_size if bits == 4 else 0)
    tied = bool(model.config.tie_word_embeddings)  # type: ignore[union-attr]
    if tied:
        model.lm_head = table
    else:
        head = QuantizedLinear.like(model.lm_head, spec)  # type: ignore[arg-type]
        model.lm_head = head
        targets["lm_head"] = head
    model.model.embed_tokens = QuantizedEmbedding(table, owns_table=not tied)  # type: ignore[union-attr]
    targets["model.embed_tokens"] = table
    return targets


@torch.no_grad()
def quantize_model_(model: nn.Module, spec: QuantSpec | str, dtype: torch.dtype | None = None) -> nn.Module:
    """Quantize a loaded float Phi4FlashForCausalLM in place (weights and biases taken from it).

    Activations then run in ``dtype`` (default bfloat16, where the CPU kernels are fast); the float
    parameters that stay are cast to it too (A_log and the lambdas stay float32).
    """
    parsed = QuantSpec.parse(spec)
    if parsed is None:
        return model
    device, dtype = model.device, dtype or torch.bfloat16  # type: ignore[union-attr]
    check_device(device, dtype, parsed)
    weights = {name: module.weight for name, module in quantizable_linears(model)}
    biases = {name: module.bias for name, module in quantizable_linears(model)}
    weights["model.embed_tokens"] = model.model.embed_tokens.weight  # type: ignore[union-attr]
    if not model.config.tie_word_embeddings:  # type: ignore[union-attr]
        weights["lm_head"], biases["lm_head"] = model.lm_head.weight, model.lm_head.bias  # type: ignore[union-attr]
    targets = quantize_modules_(model, parsed)
    for prefix, module in targets.items():
        module.set_weight(weights[prefix].detach().cpu(), device=device, dtype=dtype)
        if module.bias is not None:
            module.bias = nn.Parameter(biases[prefix].detach().to(device), requires_grad=False)
    model.to_dtype(dtype)  # type: ignore[operator]
    model.config.quantization = parsed.to_config()  # type: ignore[union-attr]
    return model


def checkpoint_modules(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Checkpoint prefix -> quantized module of a loaded model (what :func:`quantize_modules_` returned)."""
    embedding = model.model.embed_tokens  # type: ignore[union-attr]
    if not isinstance(embedding, QuantizedEmbedding):
        return {}
    modules = {name: module for name, module in model.named_modules()
               if isinstance(module, QuantizedLinear) and name not in ("lm_head", "model.embed_tokens.table")}
    modules["model.embed_tokens"] = embedding.table
    if embedding.table is not model.lm_head:
        modules["lm_head"] = model.lm_head  # type: ignore[assignment]
    return modules


def expected_quantized_tensors(targets: dict[str, QuantizedLinear]
                               ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint name -> (shape, dtype) of the portable tensors of every target."""
    expected = {}
    for prefix, module in targets.items():
        for suffix, shape_dtype in quantized_shapes(module.out_features, module.in_features, module.bits,
                                                    module.group_size).items():
            expected[f"{prefix}.{suffix}"] = shape_dtype
    return expected


def weights_label(model: nn.Module) -> str | None:
    """``int4 (g128)`` / ``int8`` for a quantized model, None for a float one."""
    labels = {m.label for m in model.modules() if isinstance(m, QuantizedLinear) and m.packed is not None}
    if not labels:
        return None
    return max(labels, key=lambda label: label.startswith("int4"))  # int4 models keep a few int8 layers


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight as held in memory: packed quantized tables plus float parameters, once each."""
    total = sum(m.nbytes for m in model.modules() if isinstance(m, QuantizedLinear) and m.packed is not None)
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) not in seen and not param.is_meta:
            seen.add(id(param))
            total += param.numel() * param.element_size()
    return total


def check_device(device: torch.device, dtype: torch.dtype, spec: QuantSpec) -> None:
    """Refuse (with the reason and the fix) a device / dtype on which the quantized kernels do not run."""
    qkernels.check_support(device, dtype, spec.bits)


def linear_reference(x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
    """x W^T + b with W dequantized in float32 from the portable tensors: the kernels' reference."""
    w = dequantize(**module.portable())
    y = F.linear(x.float(), w.to(x.device))
    return y if module.bias is None else y + module.bias.float()
