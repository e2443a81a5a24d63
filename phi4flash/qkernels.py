"""The kernels that run weight-only quantized linears, and the memory layouts they read (plus the bfloat16
matrix-vector product of decode, :class:`DecodeLinear`).

:func:`pack` turns the portable tensors of one layer (see :mod:`phi4flash.quant`) into a
:class:`PackedWeight` for one device: PyTorch's own kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu`` on CPU, ``_weight_int4pack_mm`` / ``_weight_int8pack_mm`` on CUDA
where the build has them). A device or dtype they do not cover is refused with the reason, never run
on a silent slow path.

Few rows (decode) go through the quantized matrix-vector kernel; many rows (prefill) dequantize the
weight once per call and use the dense matrix multiply, which PyTorch's quantized kernels are not made
for (measured on this project's CPU: 11-18x slower than bfloat16 ``F.linear`` at 512 rows).
"""

from __future__ import annotations

import functools
import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Above this many rows a call dequantizes the weight and runs the dense matmul (see the module docstring);
# classes whose dequantization is slow raise it.
DEQUANT_ROWS = 32
_PACK_ROWS = 4096  # rows packed at a time (a multiple of the CPU int4 layout's 64-row blocks)
_CPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class KernelUnavailableError(RuntimeError):
    """Quantized weights were asked for on a device or dtype that no available kernel runs."""


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    try:
        return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", key)
    except RuntimeError:  # the operator does not exist in this PyTorch
        return False


def check_support(device: torch.device, dtype: torch.dtype, bits: int) -> None:
    """Raise :class:`KernelUnavailableError` (reason and fix) unless ``bits``-bit weights run on ``device``."""
    name = f"int{bits}"
    if device.type == "cpu":
        op = "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm_for_cpu"
        if not _has_kernel(op, "cpu"):
            raise KernelUnavailableError(f"{name} weights need PyTorch's {op} CPU kernel, which torch "
                                         f"{torch.__version__} lacks; upgrade torch (2.6 or newer)")
        if dtype not in _CPU_DTYPES:
            raise KernelUnavailableError(f"{name} weights on CPU run with bfloat16, float16 or float32 activations, "
                                         f"not {dtype}; pass dtype='bfloat16'")
        if dtype == torch.float32:
            _warn_float32(name)
        return
    if device.type == "cuda":
        op = "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm"
        if not _has_kernel(op, "cuda"):
            alternative = "quantize='int4'" if bits == 8 else "no quantization (bfloat16 fits any large GPU)"
            raise KernelUnavailableError(f"{name} weights on CUDA need PyTorch's {op} CUDA kernel, which this "
                                         f"build (torch {torch.__version__}) lacks; use {alternative}")
        if bits == 4 and dtype != torch.bfloat16:
            raise KernelUnavailableError(f"int4 weights on CUDA run with bfloat16 activations only, not {dtype}; "
                                         "pass dtype='bfloat16'")
        return
    raise KernelUnavailableError(f"quantized weights run on CPU and CUDA, not {device.type}; load with "
                                 "device='cpu' or 'cuda', or without quantize=")


def aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """``tensor``, copied where its data does not start on an ``alignment``-byte boundary.

    PyTorch's int8 CPU kernel reads the weight with aligned vector loads and dies (SIGSEGV) on a weight that
    starts off a 16-byte boundary, which is what a tensor mapped from a checkpoint file at an odd offset does.
    """
    return tensor if tensor.data_ptr() % alignment == 0 else tensor.clone()


@functools.cache
def _warn_float32(name: str) -> None:
    logger.warning("%s weights with float32 activations: PyTorch's CPU kernels are about 10x slower than with "
                   "bfloat16; pass dtype='bfloat16' (the default with quantize=) for speed", name)


def _cpu_has_bfloat16_products() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


# Read once at import: torch.cpu's checks inside a compiled forward break its graph (dynamo does not trace them), and
# a break inside the model's layer loop made the whole training forward run eagerly under bfloat16 autocast.
_CPU_HAS_BFLOAT16_PRODUCTS = _cpu_has_bfloat16_products()


def cpu_multiplies_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX tiles).

    Without them PyTorch's bfloat16 matrix products on the CPU take a slow path: 4x (a prefill chunk's ``F.linear``)
    to 117x (a 1024 x 1024 ``a @ b``) slower than float32 on a 2-core AVX2 AMD EPYC (torch 2.13, 2026-12-03;
    benchmarks.md, "On a CPU with AVX2 only"), so the dense products of bfloat16 activations go through float32
    there (:func:`dense_linear`).
    """
    return _CPU_HAS_BFLOAT16_PRODUCTS


def float32_products(x: torch.Tensor) -> bool:
    """Whether products of ``x`` (bfloat16 on a CPU that does not multiply bfloat16) should run in float32."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_multiplies_bfloat16()


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)``; in float32, rounded back once, where bfloat16 products are slow (see
    :func:`cpu_multiplies_bfloat16`)."""
    if float32_products(x):
        return F.linear(x.float(), weight.float()).to(x.dtype)
    return F.linear(x, weight)


class PackedWeight:
    """One layer's quantized weight in a kernel's layout, with activations in ``dtype``."""

    bits: int
    device: torch.device
    dtype: torch.dtype

    def __init__(self, out_features: int, in_features: int, group_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        self.device, self.dtype = device, dtype

    dequant_rows = DEQUANT_ROWS

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) activations in ``dtype`` -> (M, N): the kernel for few rows, dequantize + dense for many."""
        if x.shape[0] > self.dequant_rows:
            return dense_linear(x, self.dequantize(x.dtype))
        return self.kernel(x)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        """(M, K) -> (M, N) through the quantized kernel."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole (N, K) weight in ``dtype``."""
        raise NotImplementedError

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """index.shape + (K,): rows of the weight in the activation dtype."""
        raise NotImplementedError

    def portable(self) -> dict[str, torch.Tensor]:
        """The portable CPU tensors this was packed from."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed tensors."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if isinstance(t, torch.Tensor))


class Int8Weight(PackedWeight):
    """Per-channel int8: q (N, K) int8 and scales (N,) in the activation dtype (CPU and CUDA share it)."""

    bits = 8

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(out_features, in_features, 0, device, dtype)
        self.qweight = aligned(tensors["qweight"].to(device).contiguous())
        self.scales = aligned(tensors["scales"].to(device=device, dtype=dtype).contiguous())

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.qweight.shape, dtype=dtype, device=self.device)
        for i in range(0, self.out_features, _PACK_ROWS):  # in float32, rounded once, in bounded pieces
            piece = slice(i, i + _PACK_ROWS)
            out[piece] = self.qweight[piece].float() * self.scales[piece].float()[:, None]
        return out

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return (self.qweight[index].float() * self.scales[index].float()[..., None]).to(self.dtype)

    def portable(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight.cpu(), "scales": self.scales.cpu().to(torch.bfloat16)}


class CpuInt4Weight(PackedWeight):
    """Group-wise int4 in the layout of PyTorch's CPU kernel (see :func:`cpu_int4_unpack`), with
    scales and zeros as one (K/g, N, 2) tensor in the activation dtype."""

    bits = 4
    dequant_rows = 128  # its dequantization is pure PyTorch (several passes): worth it only for long chunks

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, group_size: int,
                 dtype: torch.dtype) -> None:
        super().__init__(out_features, in_features, group_size, torch.device("cpu"), dtype)
        check_cpu_int4_layout()
        values = torch.stack([tensors["qweight"] & 15, tensors["qweight"] >> 4], dim=-1).view(out_features, -1)
        self.packed = cpu_int4_pack(values)
        self.scales_zeros = torch.stack([tensors["scales"], tensors["zeros"]], dim=-1).transpose(0, 1).to(
            dtype).contiguous()  # (K/g, N, 2)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)

    def _scale_zero(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        # (..., K/g) scales and zeros of the given rows
        sz = self.scales_zeros[:, index]  # (K/g, ..., 2)
        return sz[..., 0].movedim(0, -1), sz[..., 1].movedim(0, -1)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        values = cpu_int4_unpack(self.packed, self.out_features, self.in_features)
        scale, zero = self._scale_zero(slice(None))
        return _affine(values, scale.to(dtype), zero.to(dtype), self.group_size, dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        flat = index.reshape(-1)
        values = cpu_int4_rows(self.packed, self.out_features, self.in_features, flat)
        scale, zero = self._scale_zero(flat)
        out = _affine(values, scale, zero, self.group_size, self.dtype)
        return out.view(*index.shape, self.in_features)

    def portable(self) -> dict[str, torch.Tensor]:
        values = cpu_int4_unpack(self.packed, self.out_features, self.in_features)
        scale, zero = self._scale_zero(slice(None))
        return {"qweight": values[:, 0::2] | (values[:, 1::2] << 4),
                "scales": scale.to(torch.bfloat16).contiguous(), "zeros": zero.to(torch.bfloat16).contiguous()}


class CudaInt4Weight(PackedWeight):
    """Group-wise int4 in the tile layout of PyTorch's CUDA kernel (tinygemm). That layout cannot be read
    back row by row, so the portable tensors are kept too (on the GPU) for embedding rows and saving."""

    bits = 4

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, group_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(out_features, in_features, group_size, device, dtype)
        self.qweight = tensors["qweight"].to(device)
        self.scales, self.zeros = tensors["scales"].to(device, dtype), tensors["zeros"].to(device, dtype)
        self.packed = _cuda_int4_pack(self.qweight)
        self.scales_zeros = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).contiguous()

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, self.scales_zeros)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)  # a real GEMM kernel on CUDA: no dequantization for many rows

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        values = torch.stack([self.qweight & 15, self.qweight >> 4], dim=-1).view(self.out_features, -1)
        return _affine(values, self.scales.to(dtype), self.zeros.to(dtype), self.group_size, dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        q = self.qweight[index.reshape(-1)]
        values = torch.stack([q & 15, q >> 4], dim=-1).view(q.shape[0], -1)
        out = _affine(values, self.scales[index.reshape(-1)], self.zeros[index.reshape(-1)], self.group_size,
                      self.dtype)
        return out.view(*index.shape, self.in_features)

    def portable(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight.cpu(), "scales": self.scales.cpu().to(torch.bfloat16),
                "zeros": self.zeros.cpu().to(torch.bfloat16)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_zeros, self.qweight))


# A many-row product on native weights dequantizes this many weight rows at a time into a reused buffer
# (fresh memory for the whole weight would cost a page fault per 4 KB, as much as the dequantization).
DENSE_BLOCK_ROWS = 1024


class _Scratch(threading.local):
    buffer: torch.Tensor | None = None


_scratch = _Scratch()


def _scratch_rows(rows: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, in_features) buffer of this thread, reused across calls."""
    need = rows * in_features
    if _scratch.buffer is None or _scratch.buffer.numel() < need or _scratch.buffer.dtype != dtype:
        _scratch.buffer = torch.empty(need, dtype=dtype)
    return _scratch.buffer[:need].view(rows, in_features)


class _NativeTiles(PackedWeight):
    """Shared by the native layouts: many rows dequantize a block of weight rows at a time."""

    tiles: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.dequant_rows:
            return self.kernel(x)
        y = x.new_empty(x.shape[0], self.out_features)
        # where bfloat16 products are slow, the kernel writes the (bfloat16-valued) weight rows as float32
        compute = torch.float32 if float32_products(x) else x.dtype
        block = _scratch_rows(min(DENSE_BLOCK_ROWS, self.out_features), self.in_features, compute)
        x = x.to(compute)
        for first in range(0, self.out_features, block.shape[0]):
            weight = block[:min(block.shape[0], self.out_features - first)]
            torch.ops.phi4flash.dequantize_into(self.tiles, self.scales, self.zeros, self.group_size, first, weight)
            y[:, first:first + weight.shape[0]] = F.linear(x, weight)
        return y

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.phi4flash.dequantize(self.tiles, self.scales, self.zeros, self.group_size, None).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.ops.phi4flash.dequantize(self.tiles, self.scales, self.zeros, self.group_size,
                                             index.reshape(-1))
        return out.view(*index.shape, self.in_features)


class NativeInt4Weight(_NativeTiles):
    """Group-wise int4 in row tiles for phi4flash's own CPU kernels (:mod:`phi4flash.native`)."""

    bits = 4

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int,
                 group_size: int) -> None:
        super().__init__(out_features, in_features, group_size, torch.device("cpu"), torch.bfloat16)
        values = torch.stack([tensors["qweight"] & 15, tensors["qweight"] >> 4], dim=-1).view(out_features, -1)
        self.tiles = int4_tiles(values)
        self.scales = tile_columns(tensors["scales"].to(torch.bfloat16))
        self.zeros = tile_columns(tensors["zeros"].to(torch.bfloat16))

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.phi4flash.int4_linear(x, self.tiles, self.scales, self.zeros, self.group_size)

    def portable(self) -> dict[str, torch.Tensor]:
        values = int4_untiled(self.tiles)
        return {"qweight": values[:, 0::2] | (values[:, 1::2] << 4), "scales": untile_columns(self.scales),
                "zeros": untile_columns(self.zeros)}


class NativeInt8Weight(_NativeTiles):
    """Per-channel int8 in row tiles (as q + 128), for phi4flash's own CPU kernels."""

    bits = 8

    def __init__(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features, 0, torch.device("cpu"), torch.bfloat16)
        self.tiles = int8_tiles((tensors["qweight"].to(torch.int16) + 128).to(torch.uint8))
        self.scales = tensors["scales"].to(torch.bfloat16).contiguous()

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.phi4flash.int8_linear(x, self.tiles, self.scales)

    def portable(self) -> dict[str, torch.Tensor]:
        unsigned = int8_untiled(self.tiles)
        return {"qweight": (unsigned.to(torch.int16) - 128).to(torch.int8), "scales": self.scales.clone()}


# Row tiles (see phi4flash/csrc/quant_cpu.cpp): rows in tiles of TILE_ROWS; a tile is a run of 64-byte
# vectors, lane i (4 bytes) of each belonging to row i of the tile.
TILE_ROWS = 16


def int4_tiles(values: torch.Tensor) -> torch.Tensor:
    """(N, K) nibbles -> (N, K/2) bytes in row tiles: vector c of a tile holds inputs 8c .. 8c+7 of its 16 rows,
    byte j of lane i = input 8c + j | input 8c + 4 + j << 4 of row i."""
    n, k = values.shape
    v = values.to(torch.uint8).view(n // TILE_ROWS, TILE_ROWS, k // 8, 2, 4)
    return (v[:, :, :, 0] | (v[:, :, :, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def int4_untiled(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int4_tiles`: (N, K/2) bytes -> (N, K) uint8 nibbles."""
    n, half = tiles.shape
    b = tiles.view(n // TILE_ROWS, half // 4, TILE_ROWS, 4).transpose(1, 2)  # (T, 16, K/8, 4)
    return torch.stack([b & 15, b >> 4], dim=3).reshape(n, 2 * half)


def int8_tiles(values: torch.Tensor) -> torch.Tensor:
    """(N, K) bytes -> (N, K) in row tiles: vector c of a tile holds inputs 4c .. 4c+3 of its 16 rows."""
    n, k = values.shape
    return values.view(n // TILE_ROWS, TILE_ROWS, k // 4, 4).transpose(1, 2).contiguous().view(n, k)


def int8_untiled(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`int8_tiles`."""
    n, k = tiles.shape
    return tiles.view(n // TILE_ROWS, k // 4, TILE_ROWS, 4).transpose(1, 2).reshape(n, k)


def tile_columns(values: torch.Tensor) -> torch.Tensor:
    """Per-row, per-group values (N, G) -> (N/16, G, 16): one 16-lane vector per tile and group."""
    n, g = values.shape
    return values.view(n // TILE_ROWS, TILE_ROWS, g).transpose(1, 2).contiguous()


def untile_columns(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tile_columns`."""
    t, g, _ = values.shape
    return values.transpose(1, 2).reshape(t * TILE_ROWS, g).contiguous()


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the native kernels multiply by: x (M, K) quantized per block of 128 inputs to int8,
    symmetric (scale = max|x| / 127, q = round(x / scale)). Returns (q, scales (M, K/128)) in float32;
    q * scale is the activation the kernels see (a reference for tests and quality checks)."""
    m, k = x.shape
    blocks = x.float().view(m, k // 128, 128)
    scale = blocks.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, torch.round(blocks / scale[..., None]), torch.zeros(()))
    return q.view(m, k), scale


def native_kernels(device: torch.device, dtype: torch.dtype, out_features: int, in_features: int,
                   group_size: int) -> bool:
    """Whether phi4flash's own CPU kernels (torch.ops.phi4flash) run this layer: built, bfloat16 activations,
    rows in tiles of 16, widths in blocks of 128, an int4 group of 32, 64 or a multiple of 128."""
    if device.type != "cpu" or dtype != torch.bfloat16 or in_features % 128 or out_features % TILE_ROWS:
        return False
    if group_size and group_size not in (32, 64) and group_size % 128:
        return False
    return native_built()


def native_built() -> bool:
    """Whether phi4flash's own CPU kernels are built and loaded (built on the first call)."""
    from . import native

    return native.ready()


@torch.no_grad()
def pack(tensors: dict[str, torch.Tensor], bits: int, group_size: int, out_features: int, in_features: int, *,
         device: torch.device, dtype: torch.dtype) -> PackedWeight:
    """Portable tensors of one layer -> the :class:`PackedWeight` that runs on ``device``."""
    check_support(device, dtype, bits)
    if native_kernels(device, dtype, out_features, in_features, group_size):
        if bits == 8:
            return NativeInt8Weight(tensors, out_features, in_features)
        return NativeInt4Weight(tensors, out_features, in_features, group_size)
    if bits == 8:
        return Int8Weight(tensors, out_features, in_features, device, dtype)
    if device.type == "cpu":
        return CpuInt4Weight(tensors, out_features, in_features, group_size, dtype)
    return CudaInt4Weight(tensors, out_features, in_features, group_size, device, dtype)


def _affine(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
            dtype: torch.dtype) -> torch.Tensor:
    """(R, K) int4 values, (R, K/g) scales and zeros -> (q - 8) * s + z, (R, K) in ``dtype``.

    Computed in float32 and rounded once, ``_PACK_ROWS`` rows at a time (a bounded float32 temporary)."""
    rows, k = values.shape
    out = torch.empty(rows, k, dtype=dtype, device=values.device)
    for i in range(0, rows, _PACK_ROWS):
        q = values[i:i + _PACK_ROWS].view(-1, k // group_size, group_size).float() - 8
        part = q * scale[i:i + _PACK_ROWS].float()[..., None] + zero[i:i + _PACK_ROWS].float()[..., None]
        out[i:i + _PACK_ROWS] = part.view(-1, k)
    return out


# -- PyTorch's CPU int4 layout --------------------------------------------------------------------------------------
# _convert_weight_to_int4pack_for_cpu packs (N, K) values into (N, K/2) bytes, block by block of B rows (B = 64
# where PyTorch's kernels are built for AVX-512, 32 for AVX2): a block is K groups of B/2 bytes, byte j of group
# k holding row j (low nibble) and row B/2 + j (high) at input k. A last block of t < B rows is K groups of t/2
# bytes, byte j holding rows 2j and 2j + 1. The layout is PyTorch's internal one: _cpu_int4_block_rows() finds
# B once per process and check_cpu_int4_layout() verifies the whole layout.

_CPU_INT4_BLOCKS = (64, 32)  # the block heights PyTorch's CPU kernels use (AVX-512, AVX2)


def cpu_int4_pack(values: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 values in [0, 15] -> PyTorch's CPU int4 layout, ``_PACK_ROWS`` rows at a time."""
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(values[i:i + _PACK_ROWS].to(torch.int32), 1)
                      for i in range(0, values.shape[0], _PACK_ROWS)])


def _unpack_with_block(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    full = n // block * block
    blocks = packed.reshape(-1)[:full * k // 2].view(n // block, k, block // 2)
    head = torch.stack([blocks & 15, blocks >> 4], dim=1).transpose(2, 3).reshape(full, k)
    if full == n:
        return head
    tail_bytes = packed.reshape(-1)[full * k // 2:].view(k, (n - full) // 2)
    tail = torch.stack([tail_bytes & 15, tail_bytes >> 4], dim=-1).reshape(k, n - full).t()
    return torch.cat([head, tail])


@functools.cache
def _cpu_int4_block_rows() -> int:
    """The rows of one block of PyTorch's CPU int4 layout on this machine (see above); 64 when none fits (the
    layout check then refuses int4 with the reason)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=generator)
    packed = cpu_int4_pack(values)
    return next((block for block in _CPU_INT4_BLOCKS
                 if torch.equal(_unpack_with_block(packed, 128, 64, block), values)), _CPU_INT4_BLOCKS[0])


def cpu_int4_unpack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`cpu_int4_pack`: (N, K/2) packed -> (N, K) uint8 values."""
    return _unpack_with_block(packed, n, k, _cpu_int4_block_rows())


def cpu_int4_rows(packed: torch.Tensor, n: int, k: int, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (R,) of the values in PyTorch's CPU int4 layout -> (R, K) uint8, without unpacking all."""
    block = _cpu_int4_block_rows()
    half = block // 2
    full = n // block * block
    flat = packed.reshape(-1)
    blocks = flat[:full * k // 2].view(n // block, k, half)
    out = torch.empty(index.shape[0], k, dtype=torch.uint8, device=packed.device)
    in_blocks = index < full
    if bool(in_blocks.any()):
        rows = index[in_blocks]
        byte = blocks[rows // block, :, rows % half]  # (R, K)
        out[in_blocks] = (byte >> (4 * ((rows % block) // half)).to(torch.uint8)[:, None]) & 15
    if not bool(in_blocks.all()):
        rows = index[~in_blocks] - full
        tail = flat[full * k // 2:].view(k, (n - full) // 2)
        byte = tail[:, rows // 2].t()  # (R, K)
        out[~in_blocks] = (byte >> (4 * (rows % 2)).to(torch.uint8)[:, None]) & 15
    return out


@functools.cache
def check_cpu_int4_layout() -> None:
    """Verify, once, that this PyTorch packs CPU int4 weights the way :func:`cpu_int4_unpack` reads them."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (80, 64), dtype=torch.uint8, generator=generator)  # full blocks + a tail
    packed = cpu_int4_pack(values)
    rows = torch.tensor([0, 15, 16, 31, 32, 63, 64, 79])
    if not (torch.equal(cpu_int4_unpack(packed, 80, 64), values)
            and torch.equal(cpu_int4_rows(packed, 80, 64, rows), values[rows])):
        raise KernelUnavailableError(f"torch {torch.__version__} packs CPU int4 weights in a layout phi4flash does "
                                     "not know; use quantize='int8', or a torch version phi4flash supports")


# -- PyTorch's CUDA int4 layout ---------------------------------------------------------------------------------------


def _cuda_int4_pack(qweight: torch.Tensor) -> torch.Tensor:
    """Portable (N, K/2) uint8 on CUDA -> tinygemm's tiles (``_convert_weight_to_int4pack``, 8 inner k-tiles).

    The kernel reads input 2j from the high nibble (torchao packs it so); :func:`_cuda_nibbles_high_first`
    checks that once on the device and the bytes are swapped to match."""
    if _cuda_nibbles_high_first(qweight.device):
        qweight = (qweight << 4) | (qweight >> 4)
    return torch.ops.aten._convert_weight_to_int4pack(qweight.contiguous(), 8)


@functools.cache
def _cuda_nibbles_high_first(device: torch.device) -> bool:
    generator = torch.Generator().manual_seed(0)
    n, k, g = 64, 256, 128
    values = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scales = torch.rand(k // g, n, 1, generator=generator) / 8 + 0.01
    zeros = torch.randn(k // g, n, 1, generator=generator) / 8
    scales_zeros = torch.cat([scales, zeros], dim=-1).to(device, torch.bfloat16)
    x = torch.randn(4, k, generator=generator).to(device, torch.bfloat16)
    weight = _affine(values, scales[..., 0].t(), zeros[..., 0].t(), g, torch.float32).to(device)
    expected = x.float() @ weight.t()
    low_first = (values[:, 0::2] | (values[:, 1::2] << 4)).to(device)
    for high_first, data in ((True, (low_first << 4) | (low_first >> 4)), (False, low_first)):
        out = torch.ops.aten._weight_int4pack_mm(x, torch.ops.aten._convert_weight_to_int4pack(data, 8), g,
                                                 scales_zeros)
        if torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max())):
            return high_first
    raise KernelUnavailableError(f"torch {torch.__version__}'s CUDA int4 kernel reads weights in a layout phi4flash "
                                 "does not know; use quantize='int8' or no quantization on this GPU")


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` without bias; one or two rows (decode) on the CPU in bfloat16 run phi4flash's
    matrix-vector kernel when it is built (it streams the weight once; PyTorch's is slower at these shapes)."""
    rows = x.numel() // max(1, x.shape[-1])
    if (rows > 2 or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous()
            or (torch.is_grad_enabled() and weight.requires_grad) or weight.device.type != "cpu"
            or not native_built()):
        return dense_linear(x, weight)
    y = torch.ops.phi4flash.bf16_linear(x.reshape(rows, -1).contiguous(), weight)
    return y.view(*x.shape[:-1], weight.shape[0])


class DecodeLinear(nn.Linear):
    """``nn.Linear`` whose products of one or two rows (decode) on the CPU in bfloat16 run phi4flash's matrix-vector
    kernel (:func:`decode_linear`); anything else (prefill, other dtypes, training) is ``nn.Linear``'s, in float32
    where the CPU does not multiply bfloat16 (:func:`dense_linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = decode_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


def use_decode_kernels(model: nn.Module) -> None:
    """Swap the model's CPU bfloat16 ``nn.Linear`` layers for :class:`DecodeLinear` (same parameters, names and
    state dict) when phi4flash's kernels are built or the CPU does not multiply bfloat16 (its products then run in
    float32, :func:`dense_linear`); back to ``nn.Linear`` on other devices and dtypes."""
    for module in model.modules():
        if type(module) not in (nn.Linear, DecodeLinear):
            continue
        w = module.weight
        wanted = (w.device.type == "cpu" and w.dtype == torch.bfloat16
                  and (native_built() or not cpu_multiplies_bfloat16()))
        module.__class__ = DecodeLinear if wanted else nn.Linear
