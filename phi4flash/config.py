"""Phi4FlashConfig: the checkpoint's config.json as one dataclass, with the layer kinds derived once.

Layer kinds follow the official code's index rules for L = num_hidden_layers (a multiple of 4):

- even idx < L/2: ``mamba``; even idx == L/2: ``mamba_memory`` (a Mamba that also emits the GMU memory);
  even idx > L/2: ``gmu``;
- odd idx < L/2: ``sliding_attention``; odd idx == L/2 + 1: ``full_attention`` (its K/V are shared);
  odd idx > L/2 + 1: ``cross_attention`` (queries only, over the full-attention layer's K/V).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAMBA = "mamba"
MAMBA_MEMORY = "mamba_memory"
GMU = "gmu"
SLIDING_ATTENTION = "sliding_attention"
FULL_ATTENTION = "full_attention"
CROSS_ATTENTION = "cross_attention"
LAYER_KINDS = (MAMBA, MAMBA_MEMORY, GMU, SLIDING_ATTENTION, FULL_ATTENTION, CROSS_ATTENTION)
MAMBA_KINDS = (MAMBA, MAMBA_MEMORY)
ATTENTION_KINDS = (SLIDING_ATTENTION, FULL_ATTENTION, CROSS_ATTENTION)

MODEL_TYPE = "phi4flash"

# Keys the official code reads but ignores (dt_rank is always ceil(hidden / 16), the conv always has a
# bias, projections never do); accepted here so that real config files load, never used.
_IGNORED_KEYS = ("mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias", "mlp_bias", "lm_head_bias")


class ConfigError(ValueError):
    """A config.json that phi4flash cannot run; the message names the key and the reason."""


def derive_layer_kinds(num_hidden_layers: int) -> list[str]:
    """Layer kinds exactly as the official index rules give them (see the module docstring)."""
    half = num_hidden_layers // 2
    kinds = []
    for idx in range(num_hidden_layers):
        if idx % 2 == 0:
            kinds.append(MAMBA if idx < half else MAMBA_MEMORY if idx == half else GMU)
        else:
            kinds.append(SLIDING_ATTENTION if idx < half else FULL_ATTENTION if idx == half + 1 else CROSS_ATTENTION)
    return kinds


@dataclass
class Phi4FlashConfig:
    """Hyper-parameters of a Phi4Flash (SambaY) model; build it with :meth:`from_dict` or :meth:`from_json`."""

    vocab_size: int = 200064
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 40
    num_key_value_heads: int = 20
    sliding_window: int = 512
    layer_norm_eps: float = 1e-5
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 199999
    eos_token_id: int | list[int] | None = 199999
    pad_token_id: int | None = 199999
    max_position_embeddings: int = 262144
    context_length: int = 65536  # supported context (model card: 64K); not in config.json
    torch_dtype: str = "bfloat16"
    hidden_act: str = "silu"
    mb_per_layer: int = 2
    model_type: str = MODEL_TYPE
    # weight-only quantization of a checkpoint written by `phi4flash quantize` (checked by phi4flash.quant)
    quantization: dict[str, Any] | None = None
    layer_kinds: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self._validate()
        self.layer_kinds = derive_layer_kinds(self.num_hidden_layers)

    # -- derived sizes ----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Per-head width: hidden_size / num_attention_heads (there is no head_dim key)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        """Mamba inner width E = expand * hidden."""
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_dt_rank(self) -> int:
        """Always ceil(hidden / 16), as the official code computes it whatever config.json says."""
        return math.ceil(self.hidden_size / 16)

    @property
    def memory_layer(self) -> int:
        """Index of the Mamba layer that emits the GMU memory (L/2)."""
        return self.num_hidden_layers // 2

    @property
    def kv_layer(self) -> int:
        """Index of the full-attention layer whose K/V the cross-attention layers read (L/2 + 1)."""
        return self.num_hidden_layers // 2 + 1

    @property
    def stop_token_ids(self) -> list[int]:
        """eos_token_id as a list."""
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]

    # -- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Phi4FlashConfig:
        """Build from a config.json dict; unknown keys are ignored, bad values raise :class:`ConfigError`."""
        model_type = data.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"config.json has model_type={model_type!r}; phi4flash runs only model_type='phi4flash' "
                "(microsoft/Phi-4-mini-flash-reasoning and checkpoints of the same architecture)"
            )
        known = {f for f in cls.__dataclass_fields__ if f != "layer_kinds"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "torch_dtype" not in data and isinstance(data.get("dtype"), str):
            kwargs["torch_dtype"] = data["dtype"]  # transformers 5 writes the checkpoint dtype as "dtype"
        if "mb_per_layer" in data and data["mb_per_layer"] != 2:
            raise ConfigError(f"mb_per_layer={data['mb_per_layer']!r}: only 2 (Mamba on every even layer) is supported")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> Phi4FlashConfig:
        """Read a config.json file (or the config.json inside a checkpoint directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that :meth:`from_dict` (and the official code) reads back."""
        data = asdict(self)
        data.pop("layer_kinds")
        if data["quantization"] is None:
            data.pop("quantization")
        data["architectures"] = ["Phi4FlashForCausalLM"]
        data["mamba_dt_rank"] = "auto"
        return data

    # -- checks --------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"config.json key {key}={getattr(self, key)!r}: {why}")

        def positive_int(key: str) -> None:
            value = getattr(self, key)
            is_int = isinstance(value, int) and not isinstance(value, bool)
            need(is_int and value > 0, key, "must be a positive integer")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "sliding_window", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                    "context_length"):
            positive_int(key)
        need(self.num_hidden_layers % 4 == 0 and self.num_hidden_layers >= 8, "num_hidden_layers",
             "must be a multiple of 4 and at least 8, so that the layer roles line up (L/2 Mamba, L/2+1 attention)")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads", "must divide hidden_size")
        need(self.num_attention_heads % 2 == 0, "num_attention_heads",
             "must be even (differential attention pairs even and odd heads)")
        need(self.num_key_value_heads % 2 == 0, "num_key_value_heads",
             "must be even (differential attention pairs even and odd kv heads)")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             "must divide num_attention_heads")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' is supported")
        need(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0")
