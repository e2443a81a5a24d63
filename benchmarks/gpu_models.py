"""Random-weight models at the real size (or tiny), built on the GPU in bfloat16, and the loops that time them.

Used by ``benchmarks/gpu_check.py``: phi4flash from the real checkpoint's config.json, and the model the paper
compares against, transformers' ``Phi3ForCausalLM`` at Phi-4-mini-reasoning's shape, driven by its own
``generate()`` with its static cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REAL_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "checkpoint" / "config.json"


@dataclass(frozen=True)
class BaselineShape:
    """The Phi3ForCausalLM the paper compares against (defaults: Phi-4-mini-reasoning's real shape)."""

    hidden: int = 3072
    layers: int = 32
    heads: int = 24
    kv_heads: int = 8
    intermediate: int = 8192
    vocab: int = 200064


PHI4_MINI_REASONING = BaselineShape()
TINY_BASELINE = BaselineShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512)
TINY_OURS = {"hidden": 128, "layers": 8, "vocab": 512, "window": 16}  # every layer role, window < prompts


def sync(device: torch.device) -> None:
    """Wait for the device, so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- builders ---------------------------------------------------------------------------------------------------


def ours_config(tiny: bool) -> Any:
    """phi4flash's config: the real checkpoint's config.json, or a tiny one with every layer role."""
    from phi4flash import Phi4FlashConfig
    from phi4flash.bench import our_config

    return our_config(**TINY_OURS) if tiny else Phi4FlashConfig.from_json(REAL_CONFIG)


def build_phi4flash(config: Any, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Any:
    """phi4flash with random weights, built on the meta device and materialised once, in ``dtype``, on
    ``device`` (no float32 copy of a real-size model), laid out as the engine runs it."""
    from phi4flash import Phi4FlashForCausalLM

    with torch.device("meta"):
        model = Phi4FlashForCausalLM(config).to_dtype(dtype)  # cast on meta: no float32 copy anywhere
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty gives the head its own tensor: tie it again
        model.lm_head.weight = model.model.embed_tokens.weight
    torch.manual_seed(seed)
    for module in model.modules():  # what construction off the meta device does (init_weights skips conv1d)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.init_weights()
    return model.eval().tune_weight_layout()


def build_phi3(shape: BaselineShape, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Any:
    """transformers' Phi3ForCausalLM at ``shape`` with random weights, created in ``dtype`` on ``device``.

    Phi-4-mini-reasoning's layout: GQA, SwiGLU, tied embeddings, rotary on 3/4 of each head (its long-context
    rope factors left out: they change no cost), SDPA attention. No EOS token, so ``generate()`` always
    runs to ``max_new_tokens``.
    """
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        num_key_value_heads=shape.kv_heads, max_position_embeddings=131072,
                        original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in dtype: no float32 copy of the real size
    try:
        with torch.device(device):
            model = Phi3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, tied ones once."""
    return sum(p.numel() for p in model.parameters())


def millions(count: int) -> str:
    """A parameter count for people: ``3,852M``."""
    return f"{count / 1e6:,.0f}M" if count >= 1e7 else f"{count / 1e6:.2f}M"


def random_ids(shape: tuple[int, ...], vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Random token ids (3 .. vocab - 1), the same for a given seed on any device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=generator).to(device)


# -- timed loops ------------------------------------------------------------------------------------------------


@torch.no_grad()
def ours_prefill(model: Any, prompt: torch.Tensor, cache: Any, chunk: int) -> torch.Tensor:
    """Prefill ``prompt`` into ``cache`` in chunks as the engine does (the self-decoder alone on all but the
    last token, which runs the cross-decoder); returns the greedy next token of each row, (B,)."""
    model.prefill(prompt[:, :-1], cache, chunk=chunk)
    return model(prompt[:, -1:], cache=cache, logits_to_keep=1)[:, -1].argmax(-1)


@torch.no_grad()
def ours_decode(model: Any, token: torch.Tensor, cache: Any, steps: int,
                step: Callable[[torch.Tensor, Any], torch.Tensor] | None = None) -> torch.Tensor:
    """``steps`` greedy one-token steps of all rows together; returns the last tokens.

    The step the engine's decode loop takes (``model.step``, or the compiled step given as ``step``), so that
    the check measures what serving runs.
    """
    step = step or model.step
    for _ in range(steps):
        token = step(token, cache).argmax(-1)
    return token


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device's work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def ours_generate_seconds(model: Any, prompt: torch.Tensor, new_tokens: int, chunk: int,
                          step: Callable[[torch.Tensor, Any], torch.Tensor] | None = None) -> float:
    """Seconds for the paper's setting on ours: prefill the batch, then greedy steps to ``new_tokens`` each
    (the first comes from the prefill, as in transformers' ``generate()``), through ``step`` when given."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens + 1)
    return timed(lambda: ours_decode(model, ours_prefill(model, prompt, cache, chunk), cache, new_tokens - 1, step),
                 prompt.device)


def phi3_generate_seconds(model: Any, prompt: torch.Tensor, new_tokens: int, *, compile_mode: str = "auto",
                          stop_after: int | None = None) -> float:
    """Seconds of transformers' own ``generate()`` (greedy, static cache) on the batch ``prompt``.

    ``stop_after`` ends it early with a stopping criterion while the static cache keeps the size of the
    whole run (its compiled step too): calibration runs that cost little and change nothing.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            done = input_ids.shape[1] >= prompt.shape[1] + stop_after
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    options: dict[str, Any] = {"attention_mask": torch.ones_like(prompt), "do_sample": False,
                               "max_new_tokens": new_tokens, "cache_implementation": "static", "pad_token_id": 0}
    if compile_mode == "off":
        options["disable_compile"] = True
    if stop_after is not None:
        options["stopping_criteria"] = StoppingCriteriaList([StopAfter()])
    out: list[torch.Tensor] = []
    seconds = timed(lambda: out.append(model.generate(prompt, **options)), prompt.device)
    expected = prompt.shape[1] + (new_tokens if stop_after is None else stop_after)
    if out[0].shape[1] != expected:
        raise RuntimeError(f"transformers generate() returned {out[0].shape[1]} tokens per row, expected {expected}")
    return seconds
