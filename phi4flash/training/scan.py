"""The Mamba layers' two sequence operations for training on a CPU: the selective scan (chunked forward,
hand-written chunked backward: the fallback of phi4flash's C++ scan, which has a backward pass of its own and
runs whenever the kernels are built).

The model's own scan (:func:`phi4flash.ops.selective_scan`) is built for inference. Differentiating it with
autograd records every per-token step and keeps every (B, T, E, N) intermediate alive; on a CPU that is
memory traffic, not arithmetic. Here the forward pass keeps only the state at each chunk boundary and the
backward pass recomputes one chunk's states at a time, so every tensor it touches is a (B, c, E, N) chunk
that stays in cache.

The recurrence (per batch row, channel e and state n; ``a_t = exp(delta_t A)``, ``x_t = delta_t u_t B_t``)::

    h_t = a_t h_{t-1} + x_t        y_t = sum_n C_t h_t + D u_t

and its gradients, with ``g_t`` the gradient reaching ``h_t`` (from y_t and from h_{t+1})::

    g_t = gy_t C_t + a_{t+1} g_{t+1}
    dC_t = sum_e gy_t h_t      dB_t = sum_e g_t delta_t u_t      du_t = sum_n g_t delta_t B_t + D gy_t
    ddelta_t = sum_n g_t (h_{t-1} a_t A + u_t B_t)      dA = sum_{b,t} g_t h_{t-1} a_t delta_t
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK = 8  # tokens per chunk: (32, 8, 256, 8) float32 is 2 MB, about what one core's cache holds


def _chunks(length: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, length)) for start in range(0, length, size)]


class _SelectiveScan(torch.autograd.Function):
    """Selective scan from a zero state; see the module docstring for the equations."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,  # type: ignore[override]
                C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):  # float32 throughout: the states accumulate
            return _SelectiveScan._forward(ctx, u, delta, A, B, C)

    @staticmethod
    def _forward(ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Inputs are laid out time-major inside a batch row: u, delta (B, T, E); B, C (B, T, N).
        batch, length, width = u.shape
        h = u.new_zeros(batch, width, A.shape[1])
        starts = []  # the state before each chunk, for the backward pass
        ys = []
        for start, stop in _chunks(length, CHUNK):
            starts.append(h)
            a = torch.exp(delta[:, start:stop, :, None] * A)  # (B, c, E, N)
            states = (delta[:, start:stop] * u[:, start:stop])[..., None] * B[:, start:stop, None, :]
            for t in range(stop - start):
                h = torch.addcmul(states[:, t], a[:, t], h, out=states[:, t])
            ys.append(torch.einsum("bten,btn->bte", states, C[:, start:stop]))
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        return torch.cat(ys, dim=1), h.clone()

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, g_last: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor, ...]:
        with torch.autocast("cpu", enabled=False):
            return _SelectiveScan._backward(ctx, gy.float(), None if g_last is None else g_last.float())

    @staticmethod
    def _backward(ctx: Any, gy: torch.Tensor, g_last: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        u, delta, A, B, C, starts = ctx.saved_tensors
        batch, length, width = u.shape
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(A)
        g_next = g_last.clone() if g_last is not None else u.new_zeros(batch, width, A.shape[1])  # g_{t+1} a_{t+1}
        gy = gy.contiguous()
        for k, (start, stop) in reversed(list(enumerate(_chunks(length, CHUNK)))):
            n = stop - start
            d, uu = delta[:, start:stop], u[:, start:stop]  # (B, c, E)
            Bc, Cc = B[:, start:stop], C[:, start:stop]  # (B, c, N)
            a = torch.exp(d[..., None] * A)  # (B, c, E, N)
            du = d * uu
            # Recompute the chunk's states, with the one before it in front: prev[:, t] = h_{t-1}.
            prev = u.new_empty(batch, n + 1, width, A.shape[1])
            prev[:, 0] = starts[k]
            torch.mul(du[..., None], Bc[:, :, None, :], out=prev[:, 1:])
            for t in range(n):
                torch.addcmul(prev[:, t + 1], a[:, t], prev[:, t], out=prev[:, t + 1])
            h, h_prev = prev[:, 1:], prev[:, :-1]
            gyc = gy[:, start:stop]
            gC[:, start:stop] = torch.einsum("bte,bten->btn", gyc, h)
            g = gyc[..., None] * Cc[:, :, None, :]  # (B, c, E, N): the part of g_t that comes from y_t
            for t in range(n - 1, -1, -1):
                g_t = g[:, t].add_(g_next)
                torch.mul(g_t, a[:, t], out=g_next)  # g_next was read just above: reuse its memory
            # g now holds g_t for the chunk.
            gB[:, start:stop] = torch.einsum("bten,bte->btn", g, du)
            gBu = torch.einsum("bten,btn->bte", g, Bc)  # sum_n g_t B_t
            gu[:, start:stop] = gBu * d
            ga = g * h_prev * a  # dL/d(delta_t A) per (e, n)
            gdelta[:, start:stop] = torch.einsum("bten,en->bte", ga, A) + gBu * uu
            gA += torch.einsum("bten,bte->en", ga, d)
        return gu, gdelta, gA, gB, gC


def training_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for :func:`phi4flash.ops.selective_scan` (same arguments and results), fast to differentiate.

    Args:
        u: (B, E, T) inputs. delta: (B, E, T) step sizes after softplus. A: (E, N), negative.
        B, C: (B, N, T). D: (E,) skip or None. state: (B, E, N) initial state or None.

    Returns:
        (y (B, E, T) float32, last state (B, E, N) float32).
    """
    from ..ops import native_scan

    native = native_scan(u, delta, A, B, C, D, state)  # C++, with a C++ backward pass: fastest when built
    if native is not None:
        return native
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if state is not None:
        # Training always starts from zero; a given state goes through the (differentiable) reference loop.
        from ..ops import selective_scan_reference

        return selective_scan_reference(u, delta, A, B, C, D, state)
    y, last = _SelectiveScan.apply(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
                                   B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous())
    y = y.transpose(1, 2)
    if D is not None:
        y = y + D.float()[:, None] * u
    return y, last
