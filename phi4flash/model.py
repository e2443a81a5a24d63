"""Phi4Flash (SambaY): the decoder-hybrid-decoder of microsoft/Phi-4-mini-flash-reasoning, top-down.

Paper: "Decoder-Hybrid-Decoder Architecture for Efficient Reasoning with Long Generation" (arXiv 2507.06607).
Reference code: the checkpoint's ``modeling_phi4flash.py``; the spec is shared/reference/architecture.md.

Layout for L layers (see config.py): a self-decoder of Mamba and sliding-window differential attention
(layers 0 .. L/2-1), the Mamba layer L/2 that also emits the GMU memory, the full-attention layer L/2+1
whose K/V every cross-attention layer reads, then a cross-decoder of GMUs (gating by layer L/2's memory)
and query-only cross-attention layers. No positional encoding anywhere.

Glossary: B batch, T new tokens, S keys, D hidden, E Mamba inner width, K conv taps, N SSM state, R dt
rank, H query heads, Hkv kv heads, Dh head width, W window, V vocab.

Precision follows the official code: the residual stream is float32 from the first layer on, whatever
the model dtype; LayerNorm inputs are cast to the weights' dtype; the selective scan, A = -exp(A_log),
the lambda exponentials and the subln RMSNorm are computed in float32; ``A_log`` and the lambdas are
kept in float32. Module names equal checkpoint names (``model.layers.N.attn.Wqkv.weight``, ...).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import GlobalKV, MambaState, Phi4FlashCache, SlidingKV
from .config import (
    CROSS_ATTENTION,
    FULL_ATTENTION,
    GMU,
    MAMBA_KINDS,
    MAMBA_MEMORY,
    SLIDING_ATTENTION,
    Phi4FlashConfig,
)
from .ops import (
    acc_dtype,
    add_layer_norm,
    attention_mask,
    causal_conv1d_auto,
    causal_conv1d_step_auto,
    differential_attention,
    native_mamba_step,
    selective_scan_auto,
    selective_scan_step_auto,
    silu_mul,
)
from .qkernels import decode_linear, use_decode_kernels

logger = logging.getLogger(__name__)

# Parameters kept in float32 (float64 for a float64 model) whatever the model dtype.
FP32_PARAMETERS = ("A_log", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


class LossPositions(NamedTuple):
    """The N positions of a (B, T) batch whose next-token logits a training step needs: those that carry a loss.

    The cross-decoder works per token on the self-decoder's states (each GMU reads the memory at its own
    position, each cross-attention query the shared K/V of the positions up to its own), so it and the head run
    on these N tokens alone and the logits there are those of the whole forward; a prompt's tokens go through
    the self-decoder only. The N tokens go on as a (B, J) grid, J = ceil(N / B), filled row by row and padded at
    its end (so that the tokens' sizes are a product of two, as the batch's are: a compiled step does not split
    its graph on how many there are). Build it with :meth:`from_mask`; :meth:`take` lays out targets alike.
    """

    tokens: torch.Tensor  # (B, J) row * T + position of each token (the padding repeats the first)
    real: torch.Tensor  # (B, J) False at the padding
    slots: torch.Tensor  # (B, K) each row's k-th token in the grid (flattened; a shorter row repeats its last)
    positions: torch.Tensor  # (B, K) the position of each slot's token
    back: torch.Tensor  # (B, J) each token's slot in the flattened (B * K) slots (the padding: slot 0)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> LossPositions:
        """The positions where the (B, T) boolean ``mask`` is True; K is the most of them in one row."""
        batch, length = mask.shape
        device = mask.device
        counts = mask.sum(1)  # (B,)
        flat = mask.flatten().nonzero().squeeze(1)  # (N,) row by row
        n = flat.numel()
        per_row = max(-(-n // batch), 1)
        pad = batch * per_row - n
        tokens = torch.cat([flat, flat[:1].expand(pad) if n else flat.new_zeros(pad)])  # (B * J,)
        starts = counts.cumsum(0) - counts  # (B,) each row's first token in the grid
        width = max(int(counts.max()), 1)
        rank = torch.minimum(torch.arange(width, device=device)[None], (counts - 1).clamp(min=0)[:, None])
        slots = (starts[:, None] + rank).clamp(max=max(n - 1, 0))  # (B, K)
        rows = flat // length
        back = torch.cat([rows * width + torch.arange(n, device=device) - starts[rows], flat.new_zeros(pad)])
        real = torch.arange(batch * per_row, device=device) < n
        return cls(tokens.view(batch, per_row), real.view(batch, per_row), slots, tokens[slots] % length,
                   back.view(batch, per_row))

    def take(self, values: torch.Tensor, fill: float | int) -> torch.Tensor:
        """(B, T) per-position values (targets, loss weights) at the N tokens, as the logits lay them out
        (B, J), ``fill`` at the padding."""
        return torch.where(self.real, values.flatten()[self.tokens], fill)


@dataclass
class _Context:
    """Where the T new tokens sit, shared by all layers of one forward call."""

    query_pos: torch.Tensor  # (b, T) absolute positions
    key_valid: torch.Tensor | None  # (b, T) False at left padding (full forward only)
    cache: Phi4FlashCache | None
    # cache rows of this batch: None means all rows in order; a slice a run of consecutive rows (selected
    # as views, so decode reads the cache in place); else a (b,) index tensor (selected as copies)
    rows: torch.Tensor | slice | None
    # static: shapes depend on nothing but the batch (the whole global cache is attended with a mask), and
    # nothing reads a tensor's value in Python, so that the step can be compiled or captured as one graph
    static: bool = False
    # with a cache, unless static: the furthest query's position + 1, which the cache has grown to hold
    end: int | None = None
    # one-token decode: (ring size, each row's slot to write, position held by each slot read, whether the query
    # sees it) for the sliding layers, whose rings share one window: computed once a step, by the first of them
    ring: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # in the cross-decoder of a forward that keeps the loss positions only: the N tokens' places
    kept: LossPositions | None = None


# Rows are told apart by their type: torch.compile reads a slice compared by identity or isinstance as a
# constant, which fixes its symbolic length (one compiled step per batch size); a type test leaves it symbolic.
def _every_row(rows: torch.Tensor | slice | None) -> bool:
    return type(rows) is type(None)


def _is_run(rows: torch.Tensor | slice | None) -> bool:
    return type(rows) is slice


def _take(t: torch.Tensor, rows: torch.Tensor | slice | None) -> torch.Tensor:
    return t if _every_row(rows) else t[rows]


def _row_index(rows: torch.Tensor | slice | None, batch: int, device: torch.device) -> torch.Tensor:
    """The (b,) cache rows as an index tensor."""
    if _every_row(rows):
        return torch.arange(batch, device=device)
    if _is_run(rows):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def _as_rows(rows: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor | slice:
    """Consecutive rows become a slice (views, no copy); any other selection an index tensor."""
    listed = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    if listed and listed == list(range(listed[0], listed[0] + len(listed))):
        return slice(listed[0], listed[0] + len(listed))
    return torch.as_tensor(listed, dtype=torch.long, device=device)


def _put(t: torch.Tensor, rows: torch.Tensor | slice | None, value: torch.Tensor) -> None:
    if _every_row(rows):
        t.copy_(value)
    else:
        t[rows] = value


class Phi4FlashForCausalLM(nn.Module):
    """The language model: :class:`Phi4FlashModel` plus a tied LM head.

    ``model(input_ids)`` returns logits (B, T, V) in float32. With ``cache=`` the tokens continue what
    the cache holds (prefill, chunked prefill, multi-token continuation or one-token decode).
    """

    def __init__(self, config: Phi4FlashConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Phi4FlashModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cache: Phi4FlashCache | None = None, rows: list[int] | torch.Tensor | slice | None = None,
                logits_to_keep: int = 0, skip_cross_decoder: bool = True, static: bool = False,
                loss_positions: LossPositions | None = None) -> torch.Tensor:
        """Logits for the new tokens.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for real tokens, 0 for left padding (full forward without cache).
            cache: decode state to continue from and update; ``None`` for a stateless full forward.
            rows: cache rows that the B sequences occupy (default: all rows, in order). With T > 1 the
                rows must be at the same length.
            logits_to_keep: 0 for every position; 1 for the last one only, which also lets the
                cross-decoder run on the last token only (the prefill skip) unless ``skip_cross_decoder``
                is False.
            skip_cross_decoder: allow the prefill skip when ``logits_to_keep == 1``.
            static: one-token decode whose shapes depend on the batch only, for compiled or captured graphs:
                the caller makes sure the cache holds one more token (``cache.grow``), ``rows`` is None or a
                slice, and the global K/V is read whole under a mask.
            loss_positions: training without a cache: the logits of these N positions only, and the
                cross-decoder run at them only (:class:`LossPositions`).

        Returns:
            (B, T, V) float32 logits, or (B, 1, V) with ``logits_to_keep=1``, or (B, J, V) at ``loss_positions``
            (its grid of tokens: :meth:`LossPositions.take` lays out the targets alike).
        """
        last_only = logits_to_keep == 1 and skip_cross_decoder
        hidden = self.model(input_ids, attention_mask, cache=cache, rows=rows, last_only=last_only, static=static,
                            loss_positions=loss_positions)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: Phi4FlashCache,
                rows: list[int] | torch.Tensor | slice | None = None, chunk: int | None = None) -> None:
        """Extend ``cache`` by (B, T) ``input_ids`` without computing logits: the prompt tokens before the last.

        Only the self-decoder runs: the cross-decoder's layers keep no state, so nothing after the shared K/V
        is needed until the last prompt token asks for logits (through :meth:`forward`). ``chunk`` tokens go at
        a time (None: all at once), which bounds the activations' memory."""
        length = input_ids.shape[1]
        step = chunk or max(1, length)
        for start in range(0, length, step):
            self.model(input_ids[:, start:start + step], cache=cache, rows=rows, self_decoder_only=True)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: Phi4FlashCache, rows: list[int] | torch.Tensor | slice | None = None,
             static: bool = False) -> torch.Tensor:
        """One decode step: (B,) next token ids -> (B, V) float32 logits; rows may be at different lengths.

        With ``static`` the shapes depend on the batch only (see :meth:`forward`)."""
        return self(input_ids[:, None], cache=cache, rows=rows, static=static)[:, -1]

    @property
    def dtype(self) -> torch.dtype:
        """The model (activation) dtype; with quantized weights, the dtype their kernels compute in."""
        return self.model.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.model.final_layernorm.weight.device

    def new_cache(self, batch_size: int, max_length: int) -> Phi4FlashCache:
        """Empty decode state for ``batch_size`` sequences of up to ``max_length`` tokens."""
        return Phi4FlashCache(self.config, batch_size, max_length, dtype=self.dtype, device=self.device)

    def to_dtype(self, dtype: torch.dtype) -> Phi4FlashForCausalLM:
        """Cast to ``dtype``, keeping A_log and the lambdas in at least float32."""
        keep = acc_dtype(dtype)
        for name, param in self.named_parameters():
            param.data = param.data.to(keep if name.rsplit(".", 1)[-1] in FP32_PARAMETERS else dtype)
        return self

    @torch.no_grad()
    def tune_weight_layout(self) -> Phi4FlashForCausalLM:
        """Lay out each linear weight in memory the way one-token decode reads it fastest on this device.

        On CPU in float32, a weight with more outputs than inputs is stored column-major (same shape and
        values, transposed strides): measured 1.4-2.2x faster matrix-vector products at this model's
        tall shapes (3072x384: 473 -> 224 us; the 200064-row LM head at width 384: 30 -> 14 ms), while
        wide weights and bfloat16 were as fast or faster row-major, and prefill runs at the same speed
        either way. Everything else is stored row-major, as loaded; in bfloat16 on the CPU, decode's
        products run phi4flash's own matrix-vector kernel (:class:`~phi4flash.qkernels.DecodeLinear`, when
        built). Values never change; call it again after moving the model or changing its dtype.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                weight = module.weight.data
                out_features, in_features = weight.shape
                cpu_float32 = weight.device.type == "cpu" and weight.dtype == torch.float32
                column_major = cpu_float32 and out_features > in_features
                # a tied LM head is the embedding's own Parameter, so the embedding follows it
                module.weight.data = weight.t().contiguous().t() if column_major else weight.contiguous()
        use_decode_kernels(self)  # bfloat16 on the CPU: phi4flash's matrix-vector kernel for decode
        return self

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation in the style of the official code (for training and tests)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Mamba):
                module.reset_ssm_parameters()
            elif isinstance(module, DiffAttentionCore):
                for p in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                    nn.init.normal_(p, std=0.1)
                nn.init.ones_(module.subln.weight)


class Phi4FlashModel(nn.Module):
    """Embedding, the L decoder layers, the final LayerNorm; returns the final hidden states."""

    def __init__(self, config: Phi4FlashConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, idx) for idx in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cache: Phi4FlashCache | None = None, rows: list[int] | torch.Tensor | slice | None = None,
                last_only: bool = False, static: bool = False, self_decoder_only: bool = False,
                loss_positions: LossPositions | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) hidden states, or (B, 1, D) when ``last_only`` (cross-decoder skip); with
        ``self_decoder_only`` the self-decoder's (B, T, D) output, un-normalised (the caches written, the
        cross-decoder not run); with ``loss_positions`` (no cache) the (B, J, D) states of those N tokens, the
        cross-decoder run at them only."""
        config = self.config
        batch, length = input_ids.shape
        device = input_ids.device
        steps = torch.arange(length, device=device)
        if loss_positions is not None and (cache is not None or last_only or self_decoder_only):
            raise ValueError("loss_positions is for the full forward of a training batch: no cache, all layers")
        if cache is None:
            ctx = _Context(query_pos=steps.expand(batch, length), cache=None, rows=None,
                           key_valid=None if attention_mask is None else attention_mask.to(device).bool())
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is for the stateless full forward; a cache keeps each row's "
                                 "own length, so pass unpadded rows instead")
            row_index = rows if _every_row(rows) or _is_run(rows) else _as_rows(rows, device)
            start = _take(cache.lengths, row_index)
            if start.shape[0] != batch:
                raise ValueError(f"input has {batch} rows but the cache selection has {start.shape[0]}")
            if static:
                if length != 1 or not (_every_row(row_index) or _is_run(row_index)):
                    raise ValueError("a static step takes one token per row and rows as None or a slice")
            else:
                if length > 1 and bool((start != start[0]).any()):
                    raise ValueError("multi-token continuation needs all selected cache rows at the same length")
                end = int(start.max()) + length
                cache.grow(end)
            ctx = _Context(query_pos=start[:, None] + steps, key_valid=None, cache=cache, rows=row_index,
                           static=static, end=None if static else end)

        residual_dtype = acc_dtype(self.final_layernorm.weight.dtype)
        x = self.embed_tokens(input_ids).to(residual_dtype)  # (B, T, D)
        memory: torch.Tensor | None = None  # (B, T, E) from the memory layer, read by the GMUs
        shared_kv: tuple[torch.Tensor, ...] | None = None  # from the full-attention layer, read by cross layers
        for idx, layer in enumerate(self.layers):
            if self_decoder_only and idx == config.kv_layer + 1:
                break
            if last_only and idx == config.kv_layer + 1 and x.shape[1] > 1:
                # The cross-decoder works per token on the shared K/V: the last token alone gives the
                # same next-token logits, at half the prefill cost.
                x, memory = x[:, -1:], memory[:, -1:] if memory is not None else None
                ctx = replace(ctx, query_pos=ctx.query_pos[:, -1:])
            if loss_positions is not None and idx == config.kv_layer + 1:
                # The same per-token argument for the loss positions: the N tokens go on alone.
                x = x.flatten(0, 1)[loss_positions.tokens]  # (B, J, D)
                memory = memory.flatten(0, 1)[loss_positions.tokens] if memory is not None else None
                ctx = replace(ctx, query_pos=loss_positions.positions, kept=loss_positions)
            x, memory, shared_kv = layer(x, ctx, memory, shared_kv)
        if cache is not None:
            if _every_row(ctx.rows):
                cache.lengths += length
            else:
                cache.lengths[ctx.rows] += length
        if self_decoder_only:
            return x
        return _add_norm(x, None, self.final_layernorm)[1]


class DecoderLayer(nn.Module):
    """Pre-norm block: x + mixer(LN(x)), then + MLP(LN(.)); the mixer is always called ``attn``."""

    def __init__(self, config: Phi4FlashConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_kinds[layer_idx]
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.attn: nn.Module
        if self.kind in MAMBA_KINDS:
            self.attn = Mamba(config, layer_idx, emits_memory=self.kind == MAMBA_MEMORY)
        elif self.kind == GMU:
            self.attn = GatedMemoryUnit(config)
        else:
            self.attn = DiffAttention(config, layer_idx, self.kind)

    def forward(self, x: torch.Tensor, ctx: _Context, memory: torch.Tensor | None,
                shared_kv: tuple[torch.Tensor, ...] | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
        """(B, T, D) residual stream -> the same, plus the memory and shared K/V passed along."""
        x, h = _add_norm(x, None, self.input_layernorm)
        if self.kind in MAMBA_KINDS:
            out, emitted = self.attn(h, ctx)
            memory = emitted if emitted is not None else memory
        elif self.kind == GMU:
            out = self.attn(h, memory)
        else:
            out, kv = self.attn(h, ctx, shared_kv)
            shared_kv = kv if kv is not None else shared_kv
        x, h = _add_norm(x, out, self.post_attention_layernorm)
        x = x + self.mlp(h).to(x.dtype)
        return x, memory, shared_kv


def _add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm of that in the norm's dtype): the residual add and the pre-norm of the next block."""
    return add_layer_norm(x, delta, norm.weight, norm.bias, norm.eps)


class MLP(nn.Module):
    """SwiGLU without biases: fc2(up * SiLU(gate)), gate = first half of fc1's output."""

    def __init__(self, config: Phi4FlashConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        gate, up = self.fc1(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.fc2(silu_mul(gate, up))


class Mamba(nn.Module):
    """Mamba-1 mixer; with ``emits_memory`` it also returns the GMU memory (the scan's read-out with the
    D skip, before the SiLU(z) gate)."""

    def __init__(self, config: Phi4FlashConfig, layer_idx: int, emits_memory: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d, e, n, r, k = (config.hidden_size, config.mamba_d_inner, config.mamba_d_state, config.mamba_dt_rank,
                         config.mamba_d_conv)
        self.emits_memory = emits_memory
        self.d_state, self.dt_rank = n, r
        self.in_proj = nn.Linear(d, 2 * e, bias=False)
        self.conv1d = nn.Conv1d(e, e, kernel_size=k, groups=e, padding=k - 1, bias=True)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, d, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialisation of A_log, D and the dt projection."""
        if self.A_log.is_meta:
            return
        for name, value in self.initial_ssm_parameters().items():
            self.get_parameter(name).copy_(value)

    def initial_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> dict[str, torch.Tensor]:
        """Fresh values of A_log, D, dt_proj.weight and dt_proj.bias as Mamba initialises them (random dt)."""
        e, n = self.A_log.shape
        bound = self.dt_rank**-0.5
        weight = torch.empty(e, self.dt_rank).uniform_(-bound, bound)  # drawn before dt, as always
        dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        return {"A_log": torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(e, n),
                "D": torch.ones(e),
                "dt_proj.weight": weight,
                "dt_proj.bias": dt + torch.log(-torch.expm1(-dt))}  # inverse softplus

    def _delta_b_c(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., E) conv output -> delta (..., E) after softplus, B and C (..., N); float32."""
        acc = acc_dtype(x.dtype)
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(decode_linear(dt, self.dt_proj.weight).to(acc) + self.dt_proj.bias.to(acc))
        return delta, b.to(acc), c.to(acc)

    def _gate(self, y: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scan read-out y and gate input z (same shape) -> (out_proj input gated, memory or None)."""
        dtype = z.dtype
        if self.emits_memory:
            memory = y.to(dtype)
            return memory * F.silu(z), memory
        return (y * F.silu(z.to(y.dtype))).to(dtype), None

    def forward(self, h: torch.Tensor, ctx: _Context) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) -> output (B, T, D) and the memory (B, T, E) or None."""
        state = None
        if ctx.cache is not None:
            state = ctx.cache.layers[self.layer_idx]
            assert isinstance(state, MambaState)
            if h.shape[1] == 1:
                return self.step(h[:, 0], state, ctx.rows)
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, T, E) each
        x = x.transpose(1, 2)  # (B, E, T)
        valid = None if ctx.key_valid is None else ctx.key_valid[:, None, :].to(x.dtype)
        if valid is not None:  # left padding: zero inputs keep the state at zero, exactly
            x = x * valid
        # A fresh sequence starts from zero state: pass None so that a CUDA kernel may take it.
        fresh = state is None or not bool(ctx.query_pos[:, 0].any())
        x, conv_state = causal_conv1d_auto(x, self.conv1d.weight, self.conv1d.bias,
                                           None if fresh else _take(state.conv, ctx.rows))
        if valid is not None:
            x = x * valid
        delta, b, c = self._delta_b_c(x.transpose(1, 2))  # (B, T, E), (B, T, N), (B, T, N)
        A = -torch.exp(self.A_log.to(acc_dtype(x.dtype)))  # (E, N)
        y, ssm_state = selective_scan_auto(x, delta.transpose(1, 2), A, b.transpose(1, 2), c.transpose(1, 2), self.D,
                                           None if fresh else _take(state.ssm, ctx.rows))
        if state is not None:
            _put(state.conv, ctx.rows, conv_state.to(state.conv.dtype))
            _put(state.ssm, ctx.rows, ssm_state.to(state.ssm.dtype))
        gated, memory = self._gate(y.transpose(1, 2), z)  # (B, T, E)
        return self.out_proj(gated), memory

    def step(self, h: torch.Tensor, state: MambaState, rows: torch.Tensor | slice | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token: (B, D) -> output (B, 1, D) and memory (B, 1, E) or None; updates ``state``."""
        x, z = self.in_proj(h).chunk(2, dim=-1)  # (B, E) each
        conv, ssm = _take(state.conv, rows), _take(state.ssm, rows)
        if native_mamba_step(x, conv, ssm, self.conv1d.weight, self.conv1d.bias, self.dt_proj.bias, self.A_log, self.D):
            # the same step in two C++ calls around the projections (a few dozen small operations otherwise)
            x = torch.ops.phi4flash.conv_step(x, self.conv1d.weight, self.conv1d.bias, conv)
            dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
            gated, memory = torch.ops.phi4flash.scan_step(x, decode_linear(dt, self.dt_proj.weight), self.dt_proj.bias,
                                                          self.A_log, b, c, self.D, z, ssm, self.emits_memory)
            memory = memory if self.emits_memory else None
        else:
            x = causal_conv1d_step_auto(x, self.conv1d.weight, self.conv1d.bias, conv)
            delta, b, c = self._delta_b_c(x)
            A = -torch.exp(self.A_log.to(acc_dtype(x.dtype)))
            y = selective_scan_step_auto(x, delta, A, b, c, self.D, ssm)  # (B, E)
            gated, memory = self._gate(y, z)
        if not _every_row(rows):
            state.conv[rows], state.ssm[rows] = conv, ssm
        out = self.out_proj(gated)[:, None]
        return out, None if memory is None else memory[:, None]


class GatedMemoryUnit(nn.Module):
    """GMU: out_proj(SiLU(in_proj(h)) * memory), per token, no biases."""

    def __init__(self, config: Phi4FlashConfig) -> None:
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, config.mamba_d_inner, bias=False)
        self.out_proj = nn.Linear(config.mamba_d_inner, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) and memory (B, T, E) -> (B, T, D)."""
        if memory is None:
            raise RuntimeError("a GMU layer needs the memory of the memory-emitting Mamba layer")
        return self.out_proj(silu_mul(self.in_proj(h), memory.to(h.dtype)))


class DiffAttentionCore(nn.Module):
    """The lambdas and subln of differential attention (checkpoint name ``inner_cross_attn``)."""

    def __init__(self, head_dim: int, layer_idx: int, eps: float) -> None:
        super().__init__()
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)  # global layer index, Mamba layers counted
        self.lambda_q1 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.lambda_k1 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.lambda_q2 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.lambda_k2 = nn.Parameter(torch.zeros(head_dim, dtype=torch.float32))
        self.subln = RMSNormWeight(2 * head_dim)
        self.eps = eps

    def lam(self) -> torch.Tensor:
        """lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init, in float32 (0-dim)."""
        acc = acc_dtype(self.lambda_q1.dtype)
        l1 = torch.exp((self.lambda_q1.to(acc) * self.lambda_k1.to(acc)).sum())
        l2 = torch.exp((self.lambda_q2.to(acc) * self.lambda_k2.to(acc)).sum())
        return l1 - l2 + self.lambda_init

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                causal: bool = False) -> torch.Tensor:
        """q (B, T, H, Dh), k/v (B, S, Hkv, Dh) -> (B, T, H * Dh); see :func:`differential_attention`."""
        return differential_attention(q, k, v, self.lam(), self.lambda_init, self.subln.weight, self.eps, mask,
                                      causal)


class RMSNormWeight(nn.Module):
    """Holds the subln gain (checkpoint name ``subln.weight``); the norm itself is in ops."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class DiffAttention(nn.Module):
    """Differential attention: sliding-window, full (K/V shared) or cross (queries only)."""

    def __init__(self, config: Phi4FlashConfig, layer_idx: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.num_heads, self.num_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                            config.head_dim)
        self.window = config.sliding_window if kind == SLIDING_ATTENTION else None
        # Queries per block of a long prefill chunk: at least 32 so that SDPA's fused kernel runs, and small
        # against the window so that little of each block's mask is empty (128: measured best at W = 512).
        self.query_block = 128
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.Wqkv = nn.Linear(config.hidden_size, q_dim if kind == CROSS_ATTENTION else q_dim + 2 * kv_dim, bias=True)
        self.out_proj = nn.Linear(q_dim, config.hidden_size, bias=True)
        self.inner_cross_attn = DiffAttentionCore(self.head_dim, layer_idx, config.layer_norm_eps)
        self.layer_idx = layer_idx

    def forward(self, h: torch.Tensor, ctx: _Context, shared_kv: tuple[torch.Tensor, ...] | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(B, T, D) -> (B, T, D); the full-attention layer also returns (k, v, key_pos, key_valid) to share."""
        b, t, _ = h.shape
        qkv = self.Wqkv(h)
        q_dim = self.num_heads * self.head_dim
        q = qkv[..., :q_dim].view(b, t, self.num_heads, self.head_dim)  # (B, T, H, Dh)
        if self.kind == CROSS_ATTENTION:
            if shared_kv is None:
                raise RuntimeError("a cross-attention layer needs the full-attention layer's K/V")
            k, v, key_pos, key_valid = shared_kv
        else:
            k, v = qkv[..., q_dim:].view(b, t, 2, self.num_kv_heads, self.head_dim).unbind(2)  # (B, T, Hkv, Dh)
            key_pos, key_valid = ctx.query_pos, ctx.key_valid
            if ctx.cache is not None:
                state = ctx.cache.layers[self.layer_idx]
                if isinstance(state, SlidingKV):
                    k, v, key_pos, key_valid = self._sliding_keys(state, k, v, ctx)
                else:
                    assert isinstance(state, GlobalKV)
                    k, v, key_pos, key_valid = self._global_keys(state, k, v, ctx)
        if ctx.kept is not None:
            # the kept tokens as each batch row's queries at their positions, then back to the tokens' grid
            q = q.flatten(0, 1)[ctx.kept.slots]  # (B, K, H, Dh)
            y = self.inner_cross_attn(q, k, v, attention_mask(ctx.query_pos, key_pos, key_valid, self.window))
            return self.out_proj(y.flatten(0, 1)[ctx.kept.back]), None  # (B, J, D)
        if key_valid is None and t == k.shape[1] and (self.window is None or t <= self.window):
            # the queries are the keys (from position 0), without padding, and the window cuts nothing
            y = self.inner_cross_attn(q, k, v, None, causal=True)
        elif t > self.query_block:
            y = self._blocked(q, k, v, key_pos, key_valid, ctx.query_pos)
        else:
            y = self.inner_cross_attn(q, k, v, attention_mask(ctx.query_pos, key_pos, key_valid, self.window))
        return self.out_proj(y), (k, v, key_pos, key_valid) if self.kind == FULL_ATTENTION else None

    def _blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_pos: torch.Tensor,
                 key_valid: torch.Tensor | None, query_pos: torch.Tensor) -> torch.Tensor:
        """Attention for many new queries, ``query_block`` at a time against the keys they can see.

        One block of c queries needs a (c, S) mask instead of (T, S), and few of its scores are masked
        away: with a window, a block sees at most c + W - 1 keys, so the work grows with T * (c + W)
        instead of T * (T + W); without one, only the block's own triangle is wasted.

        Args:
            q: (B, T, H, Dh). k, v: (B, P + T, Hkv, Dh): P earlier keys then the T new ones, in position
                order. key_pos, key_valid: (B, P + T). query_pos: (B, T).

        Returns:
            (B, T, H * Dh).
        """
        w, c, t = self.window, self.query_block, q.shape[1]
        earlier = k.shape[1] - t
        outs = []
        for a in range(0, t, c):
            lo, hi = 0 if w is None else max(0, earlier + a - w + 1), earlier + min(a + c, t)
            mask = attention_mask(query_pos[:, a:a + c], key_pos[:, lo:hi],
                                  None if key_valid is None else key_valid[:, lo:hi], w)
            outs.append(self.inner_cross_attn(q[:, a:a + c], k[:, lo:hi], v[:, lo:hi], mask))
        return torch.cat(outs, dim=1)

    def _sliding_keys(self, state: SlidingKV, k: torch.Tensor, v: torch.Tensor, ctx: _Context
                      ) -> tuple[torch.Tensor, ...]:
        """Keys = the ring's (earlier positions) + the new ones; then the ring keeps the newest W."""
        w = state.k.shape[1]
        row = _row_index(ctx.rows, k.shape[0], k.device)[:, None]
        if k.shape[1] == 1:  # decode: write first, then the ring alone holds exactly the window
            if ctx.ring is None or ctx.ring[0] != w:
                ctx.ring = (w, *self._ring_positions(w, ctx))
            _, slot, ring_pos, ring_valid = ctx.ring
            state.k[row, slot] = k.to(state.k.dtype)
            state.v[row, slot] = v.to(state.v.dtype)
            n = ring_pos.shape[1]
            return _take(state.k[:, :n], ctx.rows), _take(state.v[:, :n], ctx.rows), ring_pos, ring_valid
        slots = torch.arange(w, device=k.device)
        # Several new tokens: the ring, rolled so that its positions ascend, then the new keys. All rows
        # are at the same length here, so one roll serves them all, and the keys come out in position order.
        # A fresh sequence has nothing in the ring: the new keys alone, all valid.
        start = ctx.query_pos[:, :1]  # (b, 1) length before these tokens
        begin = int(start[0, 0])
        if begin == 0:
            keys, values, key_pos, key_valid = k, v, ctx.query_pos, None
        else:
            ring_pos = start - w + slots  # (b, W) position held by each slot after the roll
            keys = torch.cat([_take(state.k, ctx.rows).roll(-begin % w, dims=1), k], dim=1)  # (b, W + T, Hkv, Dh)
            values = torch.cat([_take(state.v, ctx.rows).roll(-begin % w, dims=1), v], dim=1)
            key_pos = torch.cat([ring_pos, ctx.query_pos], dim=1)
            key_valid = key_pos >= 0
        keep = min(k.shape[1], w)
        slot = torch.remainder(ctx.query_pos[:, -keep:], w)  # (b, keep)
        state.k[row.expand_as(slot), slot] = k[:, -keep:].to(state.k.dtype)
        state.v[row.expand_as(slot), slot] = v[:, -keep:].to(state.v.dtype)
        return keys, values, key_pos, key_valid

    @staticmethod
    def _ring_positions(w: int, ctx: _Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode: each row's slot for the new key (b, 1), the position each ring slot read holds and whether
        the query sees it (b, n).

        Until the longest row passes the window, slot i holds position i, and only the first ``ctx.end`` slots
        are read (at a short context the attention reads a few slots, not the window's W); a slot past a row's
        own position holds an earlier request's keys and is not valid.
        """
        pos = ctx.query_pos  # (b, 1)
        if ctx.end is not None and ctx.end <= w:
            ring_pos = torch.arange(ctx.end, device=pos.device).expand(pos.shape[0], ctx.end)
            return pos, ring_pos, ring_pos <= pos
        ring_pos = pos - torch.remainder(pos - torch.arange(w, device=pos.device), w)  # (b, W)
        return torch.remainder(pos, w), ring_pos, ring_pos >= 0

    def _global_keys(self, state: GlobalKV, k: torch.Tensor, v: torch.Tensor, ctx: _Context
                     ) -> tuple[torch.Tensor, ...]:
        """Write the new K/V at their positions; keys = every position up to the furthest query (static: every
        slot of the cache, those past each row's query marked invalid)."""
        row = _row_index(ctx.rows, k.shape[0], k.device)[:, None].expand_as(ctx.query_pos)
        state.k[row, ctx.query_pos] = k.to(state.k.dtype)
        state.v[row, ctx.query_pos] = v.to(state.v.dtype)
        length = state.k.shape[1] if ctx.end is None else ctx.end
        keys = _take(state.k[:, :length], ctx.rows)  # (b, S, Hkv, Dh)
        values = _take(state.v[:, :length], ctx.rows)
        key_pos = torch.arange(length, device=k.device).expand(k.shape[0], length)
        return keys, values, key_pos, (key_pos <= ctx.query_pos[:, -1:]) if ctx.static else None
