"""Per-layer decode state of a Phi4Flash model, built from the config's layer kinds.

- Mamba layers (``mamba``, ``mamba_memory``): conv state (the last K pre-conv inputs) + SSM state.
- Sliding-window attention: a ring of exactly ``sliding_window`` keys and values. Slot ``pos % W`` holds
  position ``pos``; the model uses no positional encoding, so the order of keys in the ring is irrelevant.
- Full attention (the one layer whose K/V are shared): K/V for every position, up to ``max_length``;
  every cross-attention layer reads it.
- GMU and cross-attention layers keep nothing.

The cache has a fixed number of rows (sequences). Each row has its own length, so rows at different
positions can decode together (continuous batching); ``rows=`` in the model's forward selects them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import FULL_ATTENTION, MAMBA_KINDS, SLIDING_ATTENTION, Phi4FlashConfig


@dataclass
class MambaState:
    """conv: (B, E, K) last pre-conv inputs, newest last; ssm: (B, E, N) in float32 (or float64)."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class SlidingKV:
    """k, v: (B, W, Hkv, Dh) ring buffers; position p lives in slot p % W."""

    k: torch.Tensor
    v: torch.Tensor


@dataclass
class GlobalKV:
    """k, v: (B, max_length, Hkv, Dh); position p lives at index p."""

    k: torch.Tensor
    v: torch.Tensor


LayerState = MambaState | SlidingKV | GlobalKV


class Phi4FlashCache:
    """Decode state for ``batch_size`` sequences of up to ``max_length`` tokens each."""

    def __init__(self, config: Phi4FlashConfig, batch_size: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if max_length > config.context_length:
            raise ValueError(f"max_length={max_length} exceeds the model's context_length={config.context_length}")
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.layers: dict[int, LayerState] = {}
        state_dtype = torch.promote_types(dtype, torch.float32)
        hkv, dh = config.num_key_value_heads, config.head_dim
        for idx, kind in enumerate(config.layer_kinds):
            if kind in MAMBA_KINDS:
                e = config.mamba_d_inner
                self.layers[idx] = MambaState(
                    conv=torch.zeros(batch_size, e, config.mamba_d_conv, dtype=dtype, device=self.device),
                    ssm=torch.zeros(batch_size, e, config.mamba_d_state, dtype=state_dtype, device=self.device))
            elif kind == SLIDING_ATTENTION:
                w = config.sliding_window
                self.layers[idx] = SlidingKV(k=torch.zeros(batch_size, w, hkv, dh, dtype=dtype, device=self.device),
                                             v=torch.zeros(batch_size, w, hkv, dh, dtype=dtype, device=self.device))
            elif kind == FULL_ATTENTION:
                self.layers[idx] = GlobalKV(
                    k=torch.zeros(batch_size, max_length, hkv, dh, dtype=dtype, device=self.device),
                    v=torch.zeros(batch_size, max_length, hkv, dh, dtype=dtype, device=self.device))

    @property
    def nbytes(self) -> int:
        """Bytes held by all state tensors."""
        total = self.lengths.numel() * self.lengths.element_size()
        for state in self.layers.values():
            for t in vars(state).values():
                total += t.numel() * t.element_size()
        return total

    def bytes_per_sequence(self, length: int) -> int:
        """State bytes one sequence of ``length`` tokens needs (global K/V counted up to ``length``)."""
        total = 0
        for state in self.layers.values():
            for t in vars(state).values():
                per_row = t[0].numel() * t.element_size()
                if isinstance(state, GlobalKV):
                    per_row = per_row * length // self.max_length
                total += per_row
        return total

    def grow(self, needed: int) -> None:
        """Make room for ``needed`` positions in the global K/V (doubling, up to the context length)."""
        if needed <= self.max_length:
            return
        if needed > self.config.context_length:
            raise ValueError(f"{needed} tokens exceed the model's context_length={self.config.context_length}")
        new_length = min(max(needed, 2 * self.max_length), self.config.context_length)
        for state in self.layers.values():
            if isinstance(state, GlobalKV):
                pad = (0, 0, 0, 0, 0, new_length - self.max_length)
                state.k = torch.nn.functional.pad(state.k, pad)
                state.v = torch.nn.functional.pad(state.v, pad)
        self.max_length = new_length

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget the given rows (all when None): zero their state and length."""
        index = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.lengths[index] = 0
        for state in self.layers.values():
            for t in vars(state).values():
                t[index] = 0

    def move_row(self, source: int, target: int) -> None:
        """Move row ``source``'s state and length to row ``target`` (whose state it replaces); ``source`` is then
        free (its contents are left as they were: :meth:`reset` a row before reusing it)."""
        length = int(self.lengths[source])
        self.lengths[target] = length
        for state in self.layers.values():
            if isinstance(state, GlobalKV):
                state.k[target, :length] = state.k[source, :length]
                state.v[target, :length] = state.v[source, :length]
            else:
                for t in vars(state).values():
                    t[target] = t[source]

    def extract(self, row: int) -> Phi4FlashCache:
        """A one-row copy of ``row``, with the global K/V trimmed to its length (for conversation reuse)."""
        length = int(self.lengths[row])
        copy = Phi4FlashCache.__new__(Phi4FlashCache)
        copy.config, copy.batch_size, copy.max_length = self.config, 1, max(length, 1)
        copy.dtype, copy.device = self.dtype, self.device
        copy.lengths = self.lengths[row:row + 1].clone()
        copy.layers = {}
        for idx, state in self.layers.items():
            if isinstance(state, GlobalKV):
                copy.layers[idx] = GlobalKV(k=state.k[row:row + 1, :copy.max_length].clone(),
                                            v=state.v[row:row + 1, :copy.max_length].clone())
            else:
                copy.layers[idx] = type(state)(**{name: t[row:row + 1].clone() for name, t in vars(state).items()})
        return copy

    def load(self, row: int, snapshot: Phi4FlashCache) -> None:
        """Put a one-row ``snapshot`` (from :meth:`extract`) into ``row``."""
        length = int(snapshot.lengths[0])
        if length > self.max_length:
            raise ValueError(f"snapshot of {length} tokens does not fit max_length={self.max_length}")
        self.lengths[row] = length
        for idx, state in self.layers.items():
            source = snapshot.layers[idx]
            if isinstance(state, GlobalKV):
                state.k[row, :length] = source.k[0, :length]
                state.v[row, :length] = source.v[0, :length]
            else:
                for name, t in vars(state).items():
                    t[row] = getattr(source, name)[0]
