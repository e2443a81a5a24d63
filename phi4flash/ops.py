"""Pure tensor functions of the SambaY blocks: causal conv, selective scan, differential attention core.

Shape letters: B batch, T new tokens, S keys, E Mamba inner width, K conv taps, N SSM state size,
H query heads, Hkv key/value heads, Dh head width, W sliding window.

Every function computes in at least float32 (``acc_dtype``), whatever the model dtype, as the official
kernels do; float64 inputs stay float64 so that the model can be checked against float64 references.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


# -- causal depthwise conv ------------------------------------------------------------------------------


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over time, continuing from ``state``; SiLU applied.

    K shifted multiply-adds, summed in float32 (float64 inputs: float64) and rounded to x's dtype after the SiLU,
    as causal-conv1d's kernel does. ``F.conv1d`` rounds to x's dtype before it, and on CPUs without bfloat16
    instructions a bfloat16 depthwise conv1d runs one small convolution per channel (the real model: 5120 per
    Mamba layer, 8% of a prefill); its backward pass is a kernel of its own that torch.compile cannot fuse with the
    Mamba layer's elementwise work, where these multiply-adds fuse into the SiLU.

    Args:
        x: (B, E, T) pre-conv inputs.
        weight: (E, 1, K) conv kernel; tap K-1 multiplies the current token.
        bias: (E,) or None.
        state: (B, E, K) the last K pre-conv inputs seen so far, newest last (zeros for a fresh sequence),
            as the official cache keeps them. None means a fresh sequence.

    Returns:
        (y, new_state): y (B, E, T) after SiLU; new_state (B, E, K) the last K inputs including ``x``.
    """
    k, t, acc = weight.shape[-1], x.shape[-1], acc_dtype(x.dtype)
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[1], k)
    history = torch.cat([state.to(x.dtype), x], dim=-1)  # (B, E, K + T)
    taps = weight[:, 0].to(acc)  # (E, K)
    y = history[..., k:].to(acc) * taps[:, k - 1, None]  # (B, E, T): output t reads inputs t - K + 1 .. t
    for j in range(k - 1):
        y = y + history[..., 1 + j:1 + j + t].to(acc) * taps[:, j, None]
    if bias is not None:
        y = y + bias.to(acc)[:, None]
    return F.silu(y).to(x.dtype), history[..., -k:]


def causal_conv1d_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor) -> torch.Tensor:
    """One decode step of :func:`causal_conv1d`; updates ``state`` (B, E, K) in place.

    Args:
        x: (B, E) the new token's pre-conv input.
        weight: (E, 1, K). bias: (E,) or None. state: (B, E, K), newest last.

    Returns:
        (B, E) after SiLU.
    """
    acc = acc_dtype(x.dtype)
    state.copy_(torch.cat([state[..., 1:], x.unsqueeze(-1).to(state.dtype)], dim=-1))
    y = (state.to(acc) * weight[:, 0, :].to(acc)).sum(-1)  # (B, E)
    if bias is not None:
        y = y + bias.to(acc)
    return F.silu(y).to(x.dtype)


# -- selective scan ---------------------------------------------------------------------------------------


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None,
                             state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Mamba-1 selective scan, one time step after another (the definition; slow).

    s_t = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t;   y_t = C_t . s_t + D * u_t

    Args:
        u: (B, E, T) inputs. delta: (B, E, T) step sizes, softplus already applied. A: (E, N), negative.
        B, C: (B, N, T). D: (E,) skip or None. state: (B, E, N) initial state or None (zeros).

    Returns:
        (y, last_state): y (B, E, T) in the accumulation dtype; last_state (B, E, N).
    """
    dt = acc_dtype(u.dtype)
    u, delta, A, B, C = u.to(dt), delta.to(dt), A.to(dt), B.to(dt), C.to(dt)
    s = u.new_zeros(u.shape[0], u.shape[1], A.shape[1]) if state is None else state.to(dt)
    ys = []
    for t in range(u.shape[-1]):
        decay = torch.exp(delta[:, :, t, None] * A)  # (B, E, N)
        s = decay * s + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((s * C[:, None, :, t]).sum(-1))  # (B, E)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dt)[:, None] * u
    return y, s


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None, state: torch.Tensor | None = None,
                   chunk_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan as :func:`selective_scan_reference`, chunk by chunk with the heavy work vectorised.

    For a chunk of c tokens, every decay a_t = exp(delta_t * A) and input b_t = delta_t * B_t * u_t is
    computed at once, as are the read-outs C_t . s_t at the end; what is left per token is one fused
    multiply-add s_t = a_t * s_{t-1} + b_t, written over b_t so that the chunk's states need no copy.
    The chunk tensors are laid out (B, c, E, N) so that each token's (E, N) slice is contiguous, and
    live in buffers allocated once. (A log-depth parallel prefix scan was measured slower on CPU: it
    streams the chunk tensors log2(c) times.) Small chunks keep those tensors in cache: at E = 768,
    N = 16 on one CPU thread, c = 32 took 13 ms per 512 tokens, c = 64 25 ms.
    """
    dt = acc_dtype(u.dtype)
    u, delta, A, B, C = u.to(dt), delta.to(dt), A.to(dt), B.to(dt), C.to(dt)
    batch, width, length = u.shape
    s = u.new_zeros(batch, width, A.shape[1]) if state is None else state.to(dt)
    if length == 0:
        return u.new_zeros(batch, width, 0), s
    u_t, delta_t, B_t, C_t = u.transpose(1, 2), delta.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)
    du = delta_t * u_t  # (B, T, E)
    c = min(chunk_size, length)
    decay = u.new_empty(batch, c, width, A.shape[1])
    # two state buffers, used in turn: s, the last state of one chunk, is read while the next is written
    states_buffers = u.new_empty(2, batch, c, width, A.shape[1])
    ys = []
    for i, start in enumerate(range(0, length, c)):
        stop = min(start + c, length)
        a, states = decay[:, :stop - start], states_buffers[i % 2, :, :stop - start]  # (B, c, E, N) each
        torch.mul(delta_t[:, start:stop, :, None], A, out=a).exp_()
        torch.mul(du[:, start:stop, :, None], B_t[:, start:stop, None, :], out=states)  # inputs, then states
        for t in range(stop - start):
            s = torch.addcmul(states[:, t], a[:, t], s, out=states[:, t])  # (B, E, N)
        ys.append(torch.einsum("bten,btn->bte", states, C_t[:, start:stop]))  # (B, c, E)
    y = torch.cat(ys, dim=1).transpose(1, 2)  # (B, E, T)
    if D is not None:
        y = y + D.to(dt)[:, None] * u
    return y, s.clone()


def selective_scan_step(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """One decode step of the scan; updates ``state`` (B, E, N) in place.

    Args:
        u, delta: (B, E). A: (E, N). B, C: (B, N). D: (E,) or None.

    Returns:
        y (B, E) in the accumulation dtype.
    """
    dt = acc_dtype(u.dtype)
    u, delta, A, B, C = u.to(dt), delta.to(dt), A.to(dt), B.to(dt), C.to(dt)
    s = torch.exp(delta[..., None] * A) * state.to(dt) + (delta * u)[..., None] * B[:, None, :]
    state.copy_(s)
    y = (s * C[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(dt) * u
    return y


# -- attention ----------------------------------------------------------------------------------------------


def attention_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor | None,
                   window: int | None) -> torch.Tensor:
    """Boolean mask (True = attend) of shape (B, 1, T, S) for causal attention by absolute position.

    A query at position i sees a key at position j when j <= i and, with a window W, j > i - W: W keys
    in all, the query's own included (flash-attn window_size=(W-1, 0)). Invalid keys (padding, empty
    cache slots) are hidden, except that a query always sees its own position so that padded rows
    stay finite.

    Args:
        query_pos: (B, T) absolute positions. key_pos: (B, S). key_valid: (B, S) or None (all valid).
        window: W or None for full attention.
    """
    q = query_pos[:, :, None]
    k = key_pos[:, None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    if key_valid is not None:
        mask = mask & key_valid[:, None, :]
    mask = mask | (k == q)
    return mask[:, None]


# From this many queries on, attention takes SDPA's fused kernels (measured faster from about 24 queries on CPU
# at inference). Training's backward pass is faster through the explicit matmuls at a few hundred tokens, so the
# training loop raises it (phi4flash.training.train).
FUSED_MIN_QUERIES = 32


def differential_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                           lambda_init: float, subln_weight: torch.Tensor, eps: float,
                           mask: torch.Tensor | None, causal: bool = False, always_fused: bool = False) -> torch.Tensor:
    """Differential attention with the official even/odd head pairing.

    Heads split into even (group 1) and odd (group 2) halves, GQA within each half: query head h uses
    kv head 2 * floor((h // 2) / g) + h % 2 with g = H / Hkv. Both halves attend over [V_even || V_odd];
    Y = O1 - lambda * O2, RMS-normalised over 2*Dh channels (in float32), times (1 - lambda_init); pair j
    becomes heads 2j and 2j+1.

    Args:
        q: (B, T, H, Dh). k, v: (B, S, Hkv, Dh). lam: 0-dim lambda. subln_weight: (2*Dh,).
        mask: (B, 1, T, S) boolean or None (no masking at all).
        causal: with ``mask`` None, query i sees keys 0..i (queries and keys are the same positions);
            the fused kernel then skips the masked blocks.
        always_fused: SDPA's fused kernels whatever the count of queries (by default from
            :data:`FUSED_MIN_QUERIES` on).

    Returns:
        (B, T, H * Dh) in q's dtype.
    """
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    pairs = q.view(b, t, h // 2, 2, dh)
    v12 = v.view(b, s, hkv // 2, 2 * dh).transpose(1, 2)  # (B, Hkv/2, S, 2Dh): [V_even || V_odd] per pair, a view
    # group 0: even heads with even kv heads; group 1: odd with odd
    qs = [pairs[:, :, :, group].transpose(1, 2) for group in (0, 1)]  # (B, H/2, T, Dh) each
    scale = 1.0 / math.sqrt(dh)
    if always_fused or t >= FUSED_MIN_QUERIES:  # many queries (prefill): the fused kernels
        kv_pairs = k.view(b, s, hkv // 2, 2, dh)
        ks = [kv_pairs[:, :, :, group].transpose(1, 2) for group in (0, 1)]  # (B, Hkv/2, S, Dh) each
        # Zero-padding q and k to V's width 2Dh leaves every score unchanged and lets SDPA take its fused
        # (flash) kernel, which needs one head width for q, k and v; with Dh != 2Dh it falls back to the
        # unfused math path, 1.5x slower on CPU. An additive mask is built once for both groups.
        pad = (0, v12.shape[-1] - dh)
        bias = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
            ~mask, float("-inf"))
        outs = [F.scaled_dot_product_attention(F.pad(qg, pad), F.pad(kg, pad), v12, attn_mask=bias, scale=scale,
                                               is_causal=causal, enable_gqa=h != hkv)
                for qg, kg in zip(qs, ks, strict=True)]
    elif t == 1 and _native_decode_attention(q, k, v):  # one query per row on the CPU: the cache read in place,
        valid = None if mask is None else mask[:, 0, 0].contiguous()  # (B, S)  the combination below in C++ too
        y = torch.ops.phi4flash.diff_attention_step(q[:, 0].contiguous(), k, v, valid, scale, lam, subln_weight,
                                                    lambda_init, eps)  # (B, H * Dh)
        return y[:, None]
    else:  # few queries (decode): both groups against the cached keys and values in one pass each
        if causal:
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]
        probs = _both_groups_probs(qs, k.view(b, s, hkv // 2, 2 * dh).transpose(1, 2), mask, scale)
        o = torch.matmul(probs.to(v12.dtype), v12)  # (B, Hkv/2, 2 * g * T, 2Dh)
        outs = [part.reshape(b, h // 2, t, 2 * dh) for part in o.chunk(2, dim=2)]
    y = differential_combination(outs[0], outs[1], lam, lambda_init, subln_weight, eps)
    return y.transpose(1, 2).reshape(b, t, h * dh)


def differential_combination(o1: torch.Tensor, o2: torch.Tensor, lam: torch.Tensor, lambda_init: float,
                             subln_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Y = O1 - lambda * O2, RMS-normalised over its last dimension (2*Dh) in float32, times the subln gain and
    (1 - lambda_init); in the dtype of O1 and O2 (..., 2*Dh), rounded to it after each operation."""
    y = o1 - lam.to(o1.dtype) * o2
    acc = acc_dtype(y.dtype)
    y32 = y.to(acc)
    y = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + eps)).to(y.dtype) * subln_weight.to(y.dtype)
    return y * (1.0 - lambda_init)


def _native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether phi4flash's C++ decode attention takes these tensors: the CPU, float32 or bfloat16, each position's
    heads contiguous, no gradient wanted, and the kernels built."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    dh = q.shape[-1]
    if any(t.dtype != q.dtype or t.stride(3) != 1 or t.stride(2) != dh for t in (k, v)):
        return False
    from . import native

    return native.ready()


def native_mamba_step(x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, conv_weight: torch.Tensor,
                      conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor,
                      D: torch.Tensor | None) -> bool:
    """Whether phi4flash's C++ decode step of the Mamba mixer (``phi4flash::conv_step`` and ``scan_step``) takes
    this step: the CPU, float32 or bfloat16 activations with the convolution's state and weights in their dtype, a
    float32 scan state and A_log, no gradient wanted, the kernels built, and not while torch.compile traces the step
    (the compiled step fuses the same operations itself)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return False
    if conv_state.dtype != x.dtype or not conv_state.is_contiguous() or conv_weight.dtype != x.dtype:
        return False
    if conv_bias is not None and conv_bias.dtype != x.dtype:
        return False
    if ssm_state.dtype != torch.float32 or not ssm_state.is_contiguous():
        return False
    if A_log.dtype != torch.float32 or not A_log.is_contiguous():
        return False
    if dt_bias.dtype not in (torch.float32, torch.bfloat16) or (D is not None and D.dtype != dt_bias.dtype):
        return False
    from . import native

    return native.ready()


_LAYER_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _eager_layer_kernels(*tensors: torch.Tensor) -> Any:
    """phi4flash's C++ module when its layer functions (``add_layer_norm``, ``silu_mul``) take these tensors: the
    CPU, float32 or bfloat16, no gradient wanted, the kernels built, and not while torch.compile traces (the compiled
    step fuses the same operations itself); else None. Being eager-only, they are called on the module itself
    (pybind: about 3 us a call, against 7 through torch.ops' dispatcher; decode makes a hundred such calls a token)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    for t in tensors:
        if not t.is_cpu or t.dtype not in _LAYER_KERNEL_DTYPES:
            return None
    from . import native

    return native.load() if native.ready() else None


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream with a layer's output added, and its LayerNorm: ``x + delta.to(x.dtype)`` (x itself
    when delta is None) and the LayerNorm of that in the weight's dtype, (..., D) each. One C++ pass on the CPU
    when the kernels apply (decode runs 65 of these a token), PyTorch's operations otherwise."""
    kernels = None
    if bias is None or bias.dtype == weight.dtype:
        kernels = _eager_layer_kernels(x, weight) if delta is None else _eager_layer_kernels(x, weight, delta)
    if kernels is not None:
        total, normed = kernels.add_layer_norm(x, delta, weight, bias, eps)
        return (x if delta is None else total), normed
    if delta is not None:
        x = x + delta.to(x.dtype)
    return x, F.layer_norm(x.to(weight.dtype), weight.shape, weight, bias, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up (..., I), rounded as ``F.silu(gate) * up`` is; one C++ pass on the CPU when the kernels
    apply (gate and up of one dtype and shape, each row's values contiguous)."""
    if gate.dtype == up.dtype and gate.shape == up.shape and gate.stride(-1) == 1 and up.stride(-1) == 1:
        kernels = _eager_layer_kernels(gate)
        if kernels is not None:
            return kernels.silu_mul(gate, up)
    return F.silu(gate) * up


def _both_groups_probs(qs: list[torch.Tensor], k12: torch.Tensor, mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """Attention probabilities of both head groups, reading the cached keys once.

    Each kv pair's keys sit side by side, [K_even || K_odd] (2Dh wide, contiguous). Group 0's queries
    padded to [q || 0] and group 1's to [0 || q] score against them in one matmul: the zeros pick each
    group's own keys. Decode is bound by reading the cache, so the extra multiply-adds cost less than a
    second, strided pass over the keys.

    Args:
        qs: the two groups' queries, (B, H/2, T, Dh) each; query head i uses kv pair i // g.
        k12: (B, Hkv/2, S, 2Dh). mask: (B, 1, T, S) boolean or None.

    Returns:
        (B, Hkv/2, 2 * g * T, S) in the accumulation dtype; rows are group, then query head within the
        kv pair, then token.
    """
    b, hq, t, d = qs[0].shape
    hk, s = k12.shape[1], k12.shape[2]
    g = hq // hk
    padded = torch.cat([F.pad(qs[0].reshape(b, hk, g * t, d), (0, d)),
                        F.pad(qs[1].reshape(b, hk, g * t, d), (d, 0))], dim=2)  # (B, Hkv/2, 2gT, 2Dh)
    if t < 32:
        # keys on the left: the cache's (S, 2Dh) rows are read in place (q @ K^T makes CPU matmul copy K^T
        # first, measured 5.8x slower at a 512-key window in bfloat16)
        scores = torch.matmul(k12, padded.transpose(-1, -2)).transpose(-1, -2) * scale  # (B, Hkv/2, 2gT, S)
    else:
        # many queries (training): row-major scores, so that the mask, the softmax and their backward passes
        # run on contiguous memory (on the transposed scores they took a fifth of a training step)
        scores = torch.matmul(padded, k12.transpose(-1, -2)) * scale
    if mask is not None:
        m = mask[:, :, None].expand(b, 1, 2 * g, t, s).reshape(b, 1, 2 * g * t, s)
        scores = scores.masked_fill(~m, float("-inf"))
    return torch.softmax(scores.to(acc_dtype(scores.dtype)), dim=-1)


# -- optional CUDA kernels ------------------------------------------------------------------------------------

_KERNELS: dict[str, object] | None = None


def cuda_kernels() -> dict[str, object]:
    """The optional CUDA kernels that are importable (mamba-ssm, causal-conv1d), loaded once, lazily.

    Called only for CUDA tensors, so CPU runs never import them.
    """
    global _KERNELS
    if _KERNELS is None:
        found: dict[str, object] = {}
        try:
            from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # type: ignore[import-not-found]

            found["causal_conv1d_fn"] = causal_conv1d_fn
            found["causal_conv1d_update"] = causal_conv1d_update
        except Exception:  # noqa: BLE001 - any failure to import an optional kernel means "not available"
            pass
        try:
            from mamba_ssm.ops.selective_scan_interface import (  # type: ignore[import-not-found]
                selective_scan_fn,
            )
            from mamba_ssm.ops.triton.selective_state_update import (  # type: ignore[import-not-found]
                selective_state_update,
            )

            found["selective_scan_fn"] = selective_scan_fn
            found["selective_state_update"] = selective_state_update
        except Exception:  # noqa: BLE001
            pass
        logger.info("phi4flash CUDA kernels available: %s (pure PyTorch for the rest)", sorted(found) or "none")
        _KERNELS = found
    return _KERNELS


def _kernel(name: str, x: torch.Tensor) -> object | None:
    """The optional CUDA kernel ``name`` when ``x`` is a CUDA tensor it can take, else None."""
    if not x.is_cuda or x.dtype == torch.float64 or torch.compiler.is_compiling():  # compiled: inductor's own
        return None
    return cuda_kernels().get(name)


def causal_conv1d_auto(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_conv1d`, through causal-conv1d's kernel for a fresh sequence on CUDA when installed."""
    kernel = _kernel("causal_conv1d_fn", x)
    if kernel is None or state is not None:
        return causal_conv1d(x, weight, bias, state)
    k = weight.shape[-1]
    y = kernel(x.contiguous(), weight[:, 0, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
               activation="silu")
    return y, F.pad(x, (max(0, k - x.shape[-1]), 0))[..., -k:]


def causal_conv1d_step_auto(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            state: torch.Tensor) -> torch.Tensor:
    """:func:`causal_conv1d_step`, through causal-conv1d's update kernel on CUDA when installed."""
    kernel = _kernel("causal_conv1d_update", x)
    if kernel is None or state.dtype != x.dtype:
        return causal_conv1d_step(x, weight, bias, state)
    return kernel(x, state, weight[:, 0, :].to(x.dtype), None if bias is None else bias.to(x.dtype), "silu")


class _NativeScan(torch.autograd.Function):
    """The C++ scan with its C++ backward pass (which recomputes the states instead of storing them), for
    training and fine-tuning on the CPU. Inputs in the kernel's layouts: u, delta (B, T, E); B, C (B, T, N)."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,  # type: ignore[override]
                C: torch.Tensor, D: torch.Tensor | None, state: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(u, delta, A, B, C, D, state)
        return torch.ops.phi4flash.selective_scan(u, delta, A, B, C, D, state)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor | None, g_last: torch.Tensor | None  # type: ignore[override]
                 ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, state = ctx.saved_tensors
        gy = torch.zeros_like(u) if gy is None else gy.float().contiguous()
        g_last = None if g_last is None else g_last.float().contiguous()
        gu, gdelta, gA, gB, gC, gD, g_state = torch.ops.phi4flash.selective_scan_backward(
            u, delta, A, B, C, D, state, gy, g_last)
        return gu, gdelta, gA, gB, gC, None if D is None else gD, None if state is None else g_state


def native_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                D: torch.Tensor | None, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`selective_scan` through phi4flash's C++ kernel (:mod:`phi4flash.native`) on the CPU in float32,
    differentiable (a C++ backward pass), or None where it does not apply (another device, float64, or no
    compiled kernels)."""
    if u.device.type != "cpu" or acc_dtype(u.dtype) != torch.float32:
        return None
    from . import native

    if not native.ready():
        return None
    f32 = torch.float32
    args = (u.to(f32).transpose(1, 2).contiguous(), delta.to(f32).transpose(1, 2).contiguous(),
            A.to(f32).contiguous(), B.to(f32).transpose(1, 2).contiguous(), C.to(f32).transpose(1, 2).contiguous(),
            None if D is None else D.to(f32).contiguous(), None if state is None else state.to(f32).contiguous())
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        y, last = _NativeScan.apply(*args)
    else:
        y, last = torch.ops.phi4flash.selective_scan(*args)
    return y.transpose(1, 2), last  # (B, E, T) as a view of the kernel's (B, T, E)


def selective_scan_auto(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: torch.Tensor | None, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`selective_scan`, through the fastest kernel that takes it: mamba-ssm's for a fresh sequence on
    CUDA when installed (it cannot start from a state; delta arrives with softplus applied, so none is asked
    of it), phi4flash's C++ scan on the CPU, else the chunked PyTorch scan."""
    kernel = _kernel("selective_scan_fn", u)
    if kernel is None or state is not None:
        # The buffered scan writes into preallocated tensors: when a gradient must flow (training, fine-tuning,
        # e.g. LoRA through transformers) and the C++ scan (which has a backward pass) is not there, take the
        # step-by-step definition instead.
        native = native_scan(u, delta, A, B, C, D, state)
        if native is not None:
            return native
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D)):
            return selective_scan_reference(u, delta, A, B, C, D, state)
        return selective_scan(u, delta, A, B, C, D, state)
    f32 = torch.float32
    y, last = kernel(u.to(f32).contiguous(), delta.to(f32).contiguous(), A.to(f32).contiguous(),
                     B.to(f32).contiguous(), C.to(f32).contiguous(), None if D is None else D.to(f32),
                     return_last_state=True)
    return y, last


def selective_scan_step_auto(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    """:func:`selective_scan_step`, through mamba-ssm's state-update kernel on CUDA when installed, or
    phi4flash's C++ scan (one token) on the CPU."""
    kernel = _kernel("selective_state_update", u)
    if kernel is None or state.dtype != torch.float32:
        scanned = native_scan(u[..., None], delta[..., None], A, B[..., None], C[..., None], D, state)
        if scanned is None or state.dtype != torch.float32:
            return selective_scan_step(u, delta, A, B, C, D, state)
        state.copy_(scanned[1])
        return scanned[0][..., 0]
    f32 = torch.float32
    return kernel(state, u.to(f32), delta.to(f32), A.to(f32), B.to(f32), C.to(f32),
                  None if D is None else D.to(f32))
