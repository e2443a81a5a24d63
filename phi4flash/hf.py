"""phi4flash inside transformers: the native model behind ``AutoModelForCausalLM``, with no remote code.

``import phi4flash.hf`` registers, for ``model_type`` "phi4flash":

- :class:`Phi4FlashHFConfig` with ``AutoConfig``;
- :class:`Phi4FlashHFForCausalLM` with ``AutoModelForCausalLM``: a ``PreTrainedModel`` around the native
  :class:`phi4flash.model.Phi4FlashModel` (same modules, same checkpoint names, so ``from_pretrained`` loads
  the official safetensors as they are and peft's ``target_modules`` name the official layers);
- ``AutoTokenizer``: the checkpoint's ``tokenizer.json`` as it is, with its chat template.

``generate()``, streamers, pipelines and peft then work as for any transformers model. The decode state is
the native :class:`phi4flash.cache.Phi4FlashCache` (Mamba states, the sliding-window rings, the one shared
K/V) inside :class:`Phi4FlashHFCache`, a transformers ``Cache``; prefill runs the cross-decoder on the last
token only, as the engine does. Left-padded batches are unpadded per row: each row keeps its own length in
the cache, so padding never enters a Mamba state and every row decodes exactly as it would alone.

Explicitly registered classes take precedence over a checkpoint's ``auto_map`` in transformers 5, so even
``trust_remote_code=True`` loads the native model (and a warning says so); the checkpoint's
``modeling_phi4flash.py`` is neither downloaded nor run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .cache import Phi4FlashCache
from .config import (
    CROSS_ATTENTION,
    GMU,
    MAMBA_KINDS,
    MODEL_TYPE,
    SLIDING_ATTENTION,
    ConfigError,
    Phi4FlashConfig,
)
from .model import DiffAttentionCore, Mamba, Phi4FlashForCausalLM, Phi4FlashModel
from .weights import EMBEDDED_DIR

try:
    import transformers
    from packaging.version import Version
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationMixin,
        PreTrainedConfig,
        PreTrainedModel,
        TokenizersBackend,
    )
    from transformers import initialization as hf_init
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.auto import tokenization_auto
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("phi4flash.hf needs transformers 5: pip install 'phi4flash[hf]'") from err

MIN_TRANSFORMERS = "5.24"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):  # pragma: no cover - depends on the environment
    raise ImportError(f"phi4flash.hf needs transformers>={MIN_TRANSFORMERS} (found {transformers.__version__}): "
                      "pip install 'phi4flash[hf]'")

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDED", "Phi4FlashHFCache", "Phi4FlashHFConfig", "Phi4FlashHFForCausalLM", "register"]

EMBEDDED = str(EMBEDDED_DIR)
"""The embedded tiny model's folder, a model id for ``from_pretrained`` and ``pipeline``."""

_DEFAULTS = Phi4FlashConfig()

TRUST_REMOTE_CODE_NOTE = (
    "trust_remote_code=True was passed for a phi4flash checkpoint. phi4flash.hf has registered the native "
    "Phi4Flash classes for model_type 'phi4flash', and transformers prefers explicitly registered classes to the "
    "checkpoint's auto_map, so this is phi4flash's native model: the checkpoint's modeling_phi4flash.py is neither "
    "downloaded nor run (no flash-attn, mamba-ssm or CUDA needed). Drop trust_remote_code=True; keep "
    "`import phi4flash.hf` before loading (without it, trust_remote_code=True runs Microsoft's remote code)."
)


class Phi4FlashHFConfig(PreTrainedConfig):
    """config.json of a Phi4Flash checkpoint as a transformers config; :meth:`to_native` validates it."""

    model_type = MODEL_TYPE

    vocab_size: int = _DEFAULTS.vocab_size
    hidden_size: int = _DEFAULTS.hidden_size
    intermediate_size: int = _DEFAULTS.intermediate_size
    num_hidden_layers: int = _DEFAULTS.num_hidden_layers
    num_attention_heads: int = _DEFAULTS.num_attention_heads
    num_key_value_heads: int = _DEFAULTS.num_key_value_heads
    sliding_window: int = _DEFAULTS.sliding_window
    layer_norm_eps: float = _DEFAULTS.layer_norm_eps
    mamba_d_state: int = _DEFAULTS.mamba_d_state
    mamba_d_conv: int = _DEFAULTS.mamba_d_conv
    mamba_expand: int = _DEFAULTS.mamba_expand
    tie_word_embeddings: bool = _DEFAULTS.tie_word_embeddings
    bos_token_id: int | None = _DEFAULTS.bos_token_id
    eos_token_id: int | list[int] | None = _DEFAULTS.eos_token_id
    pad_token_id: int | None = _DEFAULTS.pad_token_id
    max_position_embeddings: int = _DEFAULTS.max_position_embeddings
    context_length: int = _DEFAULTS.context_length
    hidden_act: str = _DEFAULTS.hidden_act
    mb_per_layer: int = _DEFAULTS.mb_per_layer
    use_cache: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        """Validate like the native config (a bad value raises :class:`phi4flash.ConfigError`)."""
        # The official config.json asks for flash_attention_2, a choice of its remote code; the native model
        # picks its own kernels, so transformers must not try to set up flash-attn for it.
        kwargs.pop("_attn_implementation", None)
        super().__post_init__(**kwargs)
        if getattr(self, "quantization", None) is not None:
            raise ConfigError("this checkpoint was quantized by `phi4flash quantize`; load it with phi4flash.load() "
                              "or phi4flash.load_model() (transformers loads the unquantized checkpoints)")
        self.to_native()

    def to_native(self) -> Phi4FlashConfig:
        """The same hyper-parameters as a native :class:`phi4flash.Phi4FlashConfig`."""
        # The whole config.json dict (the native reader takes what it knows, "dtype" included), so that keys
        # the native config gains later travel without a list to keep in step here.
        return Phi4FlashConfig.from_dict({**self.to_dict(), "model_type": MODEL_TYPE})


class Phi4FlashHFCache(Cache):
    """The native decode state (:class:`phi4flash.cache.Phi4FlashCache`) as a transformers ``Cache``.

    Built empty (``generate()`` makes one, or pass ``cache=Phi4FlashHFCache()`` to keep it between calls);
    the model allocates the native state on its first forward, for that batch, and grows it as needed.
    ``get_seq_length()`` counts positions as transformers does (left padding included); each row's own
    length, padding excluded, is ``state.lengths``. A recurrent state cannot be rolled back, so ``crop``
    works only for zero tokens (transformers then avoids the generation modes that need it).
    """

    def __init__(self, state: Phi4FlashCache | None = None) -> None:
        """Wrap ``state`` (None: allocated by the model's first forward)."""
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = 0 if state is None else int(state.lengths.max())

    def __repr__(self) -> str:
        """Batch, positions seen and bytes held."""
        held = 0 if self.state is None else self.state.nbytes
        return f"Phi4FlashHFCache(batch_size={self.batch_size}, seen_tokens={self.seen_tokens}, bytes={held})"

    def __len__(self) -> int:
        """Number of model layers (0 before the first forward)."""
        return 0 if self.state is None else self.state.config.num_hidden_layers

    def _kinds(self) -> list[str]:
        return [] if self.state is None else self.state.config.layer_kinds

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions processed so far (padding included), as transformers counts them."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: the state grows on demand (up to the model's context length)."""
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """(kv length, kv offset) in transformers' sense."""
        return self.seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        """Whether any token has been processed."""
        return self.seen_tokens > 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Not used: the phi4flash model reads and writes its state itself."""
        raise NotImplementedError("Phi4FlashHFCache is filled by Phi4FlashHFForCausalLM.forward, not by update()")

    @property
    def is_compileable(self) -> bool:
        """False: the global K/V grows, and transformers must not build static-cache masks for it."""
        return False

    @property
    def is_croppable(self) -> bool:
        """False: Mamba states cannot be rolled back."""
        return False

    @property
    def is_initialized(self) -> bool:
        """Whether the native state has been allocated."""
        return self.state is not None

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: a Mamba (linear recurrent) layer."""
        return [kind in MAMBA_KINDS for kind in self._kinds()]

    @property
    def is_sliding(self) -> list[bool]:
        """Per layer: a sliding-window attention layer."""
        return [kind == SLIDING_ATTENTION for kind in self._kinds()]

    @property
    def is_dummy(self) -> list[bool]:
        """Per layer: keeps no state (GMU and cross-attention layers read the shared ones)."""
        return [kind in (GMU, CROSS_ATTENTION) for kind in self._kinds()]

    @property
    def batch_size(self) -> int:
        """Rows of the state, or -1 before the first forward."""
        return -1 if self.state is None else self.state.batch_size

    def crop(self, tokens_to_remove: int) -> None:
        """Only ``crop(0)`` (a no-op): a recurrent state cannot forget tokens."""
        if tokens_to_remove:
            raise ValueError("a Phi4Flash cache cannot be cropped: Mamba states cannot be rolled back")

    def reset(self) -> None:
        """Forget everything (the state is kept allocated)."""
        if self.state is not None:
            self.state.reset()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows in the order of ``beam_idx`` (beam search)."""
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in place."""
        if self.state is not None:
            self._select_rows(torch.arange(self.state.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``."""
        self._select_rows(indices)

    def _select_rows(self, index: torch.Tensor) -> None:
        if self.state is None:
            return
        state = self.state
        index = index.to(state.device)
        for layer in state.layers.values():
            for name, tensor in vars(layer).items():
                setattr(layer, name, tensor.index_select(0, index))
        state.lengths = state.lengths.index_select(0, index)
        state.batch_size = int(index.numel())

    def state_for(self, model: Phi4FlashHFForCausalLM, batch: int, new_tokens: int) -> Phi4FlashCache:
        """The native state for ``batch`` rows, allocated on first use with room for ``new_tokens`` and more."""
        if self.state is None:
            config = model.native_config
            room = min(config.context_length, max(new_tokens + 256, 1024))
            weight = model.model.embed_tokens.weight
            self.state = Phi4FlashCache(config, batch, room, dtype=weight.dtype, device=weight.device)
        elif self.state.batch_size != batch:
            raise ValueError(f"this cache holds {self.state.batch_size} sequences but the input has {batch} rows; "
                             "pass a new Phi4FlashHFCache() for a new batch")
        return self.state


class Phi4FlashHFForCausalLM(PreTrainedModel, GenerationMixin):
    """The native Phi4Flash as a transformers causal LM: ``from_pretrained``, ``generate()``, pipelines, peft.

    Module names are the checkpoint's (``model.layers.N.attn.Wqkv``, ``...mlp.fc1``, ``lm_head``), so the
    official safetensors load as they are and ``save_pretrained`` writes them back under the same names.
    """

    config_class = Phi4FlashHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    loss_type = "ForCausalLM"
    # One decode state serves every layer (the memory and the shared K/V pass between them), so device_map
    # never splits the model: "auto" puts all of it on one device.
    _no_split_modules = ["Phi4FlashModel"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _is_stateful = True  # no assisted decoding: a recurrent state cannot verify draft tokens and roll back
    supports_gradient_checkpointing = False

    def __init__(self, config: Phi4FlashHFConfig) -> None:
        """Build the native modules for ``config`` (weights come from ``from_pretrained`` or ``post_init``)."""
        super().__init__(config)
        self.native_config = config.to_native()
        self.model = Phi4FlashModel(self.native_config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``; says what ``trust_remote_code=True`` does here (see the module)."""
        if kwargs.get("trust_remote_code"):
            logger.warning(TRUST_REMOTE_CODE_NOTE)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (tied to the LM head in the official checkpoint)."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the token embedding."""
        self.model.embed_tokens = value

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults, plus Mamba's and differential attention's own initialisation."""
        super()._init_weights(module)
        if isinstance(module, Mamba):
            # through transformers' init functions, which leave weights loaded from the checkpoint alone
            for name, value in module.initial_ssm_parameters().items():
                hf_init.copy_(module.get_parameter(name), value)
        elif isinstance(module, DiffAttentionCore):
            for param in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                hf_init.normal_(param, std=0.1)

    def to_native(self) -> Phi4FlashForCausalLM:
        """A native :class:`phi4flash.Phi4FlashForCausalLM` sharing these modules (no copy).

        For :func:`phi4flash.save_checkpoint` (e.g. after peft's ``merge_and_unload()``) or the engine.
        """
        with torch.device("meta"):
            native = Phi4FlashForCausalLM(self.native_config)
        native.model, native.lm_head = self.model, self.lm_head
        return native

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
                ) -> CausalLMOutputWithPast:
        """Logits (and the loss with ``labels``) for ``input_ids``.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), or (B, past + T) with a cache; 0 marks padding (left padding from
                ``generate()``): padded positions are skipped, each row runs as if alone.
            cache: a :class:`Phi4FlashHFCache` to continue from and update (``generate()`` passes it).
            labels: (B, T) targets for the causal LM loss (-100 ignored); trains without a cache.
            use_cache: build and return a cache (default: ``config.use_cache`` when not training and
                without ``labels``).
            logits_to_keep: 0 for every position; k for the last k. With 1, prefill runs the
                cross-decoder on the last token only.
            inputs_embeds: not supported (the model starts from token ids).
            **kwargs: transformers' extra arguments (``num_items_in_batch`` for the loss, ...).

        Returns:
            ``CausalLMOutputWithPast``: float32 ``logits``, ``loss`` with labels, ``cache`` when caching.
        """
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("Phi4FlashHFForCausalLM takes input_ids (inputs_embeds is not supported)")
        kwargs.pop("position_ids", None)  # no positional encoding: positions live in the cache
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and labels is None
        if cache is not None and not isinstance(cache, Phi4FlashHFCache):
            if cache.get_seq_length() > 0:
                raise TypeError(f"a Phi4Flash model needs a Phi4FlashHFCache, got a filled {type(cache).__name__}")
            cache = None  # an empty generic cache (made by generate()): ours replaces it
        if cache is None and use_cache:
            cache = Phi4FlashHFCache()
        if cache is None:
            last_only = logits_to_keep == 1
            hidden = self.model(input_ids, attention_mask, last_only=last_only)
            if logits_to_keep and not last_only:
                hidden = hidden[:, -logits_to_keep:]
        else:
            hidden = self._cached_hidden(input_ids, attention_mask, cache, logits_to_keep)
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _cached_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       cache: Phi4FlashHFCache, logits_to_keep: int) -> torch.Tensor:
        """Final hidden states of the new tokens, continuing each row of ``cache`` from its own length.

        Rows are grouped by (length so far, real new tokens): a group runs as one batch. Without padding
        and with the rows level that is one call; one-token decode steps are always one call.
        """
        batch, length = input_ids.shape
        state = cache.state_for(self, batch, length)
        real = None if attention_mask is None else attention_mask[:, -length:].to(input_ids.device).bool()
        if real is not None and bool(real.all()):
            real = None
        counts = [length] * batch if real is None else real.sum(dim=1).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        starts = state.lengths.tolist()
        for row, (start, count) in enumerate(zip(starts, counts, strict=True)):
            if count:
                groups.setdefault((0 if length == 1 else start, count), []).append(row)
        last_only = logits_to_keep == 1
        width = self.config.hidden_size
        out = None
        for rows in groups.values():
            index = torch.tensor(rows, device=input_ids.device)
            ids = input_ids.index_select(0, index)
            if real is not None:
                ids = torch.stack([ids[i][real[row]] for i, row in enumerate(rows)])
            hidden = self.model(ids, cache=state, rows=None if rows == list(range(batch)) else rows,
                                last_only=last_only)  # (b, count or 1, D)
            if out is None:
                out = hidden.new_zeros(batch, 1 if last_only else length, width)
            if last_only:
                out[index] = hidden[:, -1:]
            elif real is None:
                out[index] = hidden
            else:
                for i, row in enumerate(rows):
                    out[row, real[row]] = hidden[i]
        cache.seen_tokens += length
        if out is None:  # every row was padding only
            out = self.model.embed_tokens.weight.new_zeros(batch, 1 if last_only else length, width)
        if logits_to_keep > 1:
            out = out[:, -logits_to_keep:]
        return out


def register() -> None:
    """Register the config, the model and the tokenizer with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, Phi4FlashHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi4FlashHFConfig, Phi4FlashHFForCausalLM, exist_ok=True)
    AutoTokenizer.register(Phi4FlashHFConfig, tokenizer_class=TokenizersBackend, exist_ok=True)
    # The official tokenizer_config.json names GPT2Tokenizer, which transformers 5 rebuilds from the vocabulary
    # and merges with GPT-2's pre-tokenizer, dropping tokenizer.json's o200k split (numbers, for one, split
    # differently). Mapping the model type to TokenizersBackend loads tokenizer.json as it is, the treatment
    # transformers gives the Phi-3 family's checkpoints (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
    tokenization_auto.TOKENIZER_MAPPING_NAMES.setdefault(MODEL_TYPE, "TokenizersBackend")


register()
