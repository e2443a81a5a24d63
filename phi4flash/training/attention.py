"""Differential attention for training batches on a CPU, in the causal case: every chat from position 0, no
padding mask, a window no shorter than the batch. That is every attention call of ``phi4flash train`` but those
of batches longer than the sliding window, which go to the model's own attention.

The model's :func:`phi4flash.ops.differential_attention` serves inference. For many queries it takes SDPA's fused
kernel, which needs one head width for queries, keys and values, so it pads the queries and keys (Dh wide) with
zeros to the values' 2Dh and does twice the work for the scores and their gradients; for few queries it scores
both head groups in one matmul, padded the same way. Here each head group scores its own keys at their own width,
and the queries go in :data:`BLOCKS` blocks, each against the keys up to its last query only: the scores of the
masked upper triangle are mostly never computed, and each block's scores are a quarter of the whole. A fixed
count (not a fixed size) of blocks keeps the code free of loops over the length, so that the compiled training
step still takes batches of any length in one graph.
"""

from __future__ import annotations

import math

import torch

from .. import ops

BLOCKS = 4  # query blocks of a long batch (4 x 128 at the window's 512 tokens)
BLOCKED_MIN_QUERIES = 192  # shorter batches attend in one block (4 blocks of 32 were 0.85x the padded matmuls at 128)


def training_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, lambda_init: float,
                       subln_weight: torch.Tensor, eps: float, mask: torch.Tensor | None,
                       causal: bool = False) -> torch.Tensor:
    """Drop-in for :func:`phi4flash.ops.differential_attention` (same arguments and result); a call that is not
    the causal case (a mask, or queries other than the keys) goes to it, and fewer queries than keys under a mask
    (the cross-attention at a step's loss positions, :class:`phi4flash.model.LossPositions`) to its fused kernel
    whatever their count: one graph for any count, and as fast as the explicit matmuls or faster from about 60
    queries on (forward and backward, 2026-12-05).

    Args:
        q: (B, T, H, Dh). k, v: (B, S, Hkv, Dh). lam: 0-dim lambda. subln_weight: (2Dh,).
        mask: (B, 1, T, S) boolean or None. causal: with ``mask`` None, query i sees keys 0..i.

    Returns:
        (B, T, H * Dh) in q's dtype.
    """
    b, t, h, dh = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if mask is not None or not causal or s != t:
        return ops.differential_attention(q, k, v, lam, lambda_init, subln_weight, eps, mask, causal,
                                          always_fused=mask is not None and s != t)
    pairs, g = hkv // 2, h // hkv  # kv pairs; query heads per kv head within a head group
    # Query head 2j + group (pair-index j = p g + i) scores key head 2p + group and sums the pair's values
    # [V_2p || V_2p+1]; both groups' queries, by kv pair: (B, P, 2, g, T, Dh).
    queries = q.view(b, t, pairs, g, 2, dh).permute(0, 2, 4, 3, 1, 5)
    keys = k.view(b, t, pairs, 2, dh).permute(0, 2, 3, 4, 1)  # (B, P, 2, Dh, T): K^T per group
    values = v.view(b, t, pairs, 2 * dh).transpose(1, 2)  # (B, P, T, 2Dh)
    scale = 1.0 / math.sqrt(dh)
    count = BLOCKS if t >= BLOCKED_MIN_QUERIES else 1
    bounds = [t * i // count for i in range(count + 1)]
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        scores = torch.matmul(queries[:, :, :, :, start:stop], keys[..., None, :, :stop]) * scale  # (B,P,2,g,c,stop)
        query_pos = torch.arange(start, stop, device=q.device)
        visible = torch.arange(stop, device=q.device)[None, :] <= query_pos[:, None]  # (c, stop)
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores.to(ops.acc_dtype(scores.dtype)), dim=-1).to(values.dtype)
        outs.append(torch.matmul(probs.flatten(2, 4), values[:, :, :stop]).unflatten(2, (2, g, stop - start)))
    o = torch.cat(outs, dim=4) if count > 1 else outs[0]  # (B, P, 2, g, T, 2Dh)
    o1, o2 = (o[:, :, group].reshape(b, pairs * g, t, 2 * dh) for group in (0, 1))  # (B, H/2, T, 2Dh)
    y = ops.differential_combination(o1, o2, lam, lambda_init, subln_weight, eps)
    return y.transpose(1, 2).reshape(b, t, h * dh)
