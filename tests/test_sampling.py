"""Sampling filters on hand-made logits, greedy, repetition penalty, masking, seeding, validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_helpers import REFERENCE_CHECKPOINT

from phi4flash.sampling import (
    GenerationConfig,
    Sampler,
    default_generation_config,
    generation_config_defaults,
    make_generator,
    sample_next,
)

REAL = REFERENCE_CHECKPOINT


def support(logits: torch.Tensor, config: GenerationConfig, draws: int = 400, **kwargs) -> set[int]:
    """The set of ids drawn from a single row over many draws (rows repeated to draw in one call)."""
    batch = logits.expand(draws, -1).clone()
    out = sample_next(batch, config, make_generator(0), **kwargs)
    return set(out.tolist())


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    out = sample_next(logits, GenerationConfig(temperature=0.0))
    assert out.dtype == torch.int64 and out.shape == (5,)
    assert torch.equal(out, logits.argmax(-1))


def test_input_not_modified_and_bf16_accepted() -> None:
    logits = torch.randn(2, 30)
    before = logits.clone()
    sample_next(logits, GenerationConfig(top_k=3, repetition_penalty=1.5), previous_ids=[[1, 2], [3]])
    assert torch.equal(logits, before)
    assert sample_next(logits.bfloat16(), GenerationConfig(temperature=0.0)).shape == (2,)


def test_top_k_keeps_exactly_k_even_with_ties() -> None:
    logits = torch.tensor([[5.0, 5.0, 5.0, 5.0, 1.0, 0.0]])
    got = support(logits, GenerationConfig(temperature=1.0, top_p=1.0, top_k=2), draws=2000)
    assert len(got) == 2 and got <= {0, 1, 2, 3}
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert support(logits, GenerationConfig(temperature=1.0, top_p=1.0, top_k=3), draws=2000) == {0, 1, 2}


def test_top_p_boundary() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    config = GenerationConfig(temperature=1.0, top_p=1.0)
    # Smallest set reaching top_p: 0.5 < 0.6 needs the second token; 0.5 + 0.3 = 0.8 covers up to 0.8.
    assert support(logits, GenerationConfig(temperature=1.0, top_p=0.6)) == {0, 1}
    assert support(logits, GenerationConfig(temperature=1.0, top_p=0.79)) == {0, 1}
    assert support(logits, GenerationConfig(temperature=1.0, top_p=0.81), draws=2000) == {0, 1, 2}
    assert support(logits, GenerationConfig(temperature=1.0, top_p=0.4)) == {0}  # never empty
    assert support(logits, config, draws=3000) == {0, 1, 2, 3}


def test_min_p() -> None:
    probs = torch.tensor([[0.5, 0.26, 0.24]])  # min_p 0.5 -> threshold 0.25
    got = support(probs.log(), GenerationConfig(temperature=1.0, top_p=1.0, min_p=0.5), draws=2000)
    assert got == {0, 1}


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0]])
    n = 4000
    counts = []
    for temperature in (2.0, 0.25):
        out = sample_next(logits.expand(n, -1), GenerationConfig(temperature=temperature, top_p=1.0), make_generator(1))
        counts.append((out == 0).float().mean().item())
    expected = [1 / (1 + math.exp(-1 / 2.0)), 1 / (1 + math.exp(-1 / 0.25))]
    assert counts[0] == pytest.approx(expected[0], abs=0.03)
    assert counts[1] == pytest.approx(expected[1], abs=0.03)


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    n = 6000
    out = sample_next(probs.log().expand(n, -1), GenerationConfig(temperature=1.0, top_p=1.0), make_generator(3))
    freq = torch.bincount(out, minlength=3).float() / n
    assert torch.allclose(freq, probs, atol=0.03)


def test_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    greedy = GenerationConfig(temperature=0.0, repetition_penalty=2.0)
    assert sample_next(logits, greedy, previous_ids=[[0]]).item() == 1  # 2.0 / 2 = 1.0 < 1.9
    logits = torch.tensor([[-1.0, -1.1, -5.0]])
    assert sample_next(logits, greedy, previous_ids=[[0]]).item() == 1  # -1.0 * 2 = -2.0 < -1.1
    assert sample_next(logits, greedy, previous_ids=[[]]).item() == 0
    # Rows are penalised independently; out-of-range ids are ignored.
    batch = torch.tensor([[2.0, 1.9], [2.0, 1.9]])
    out = sample_next(batch, greedy, previous_ids=[[0, 0, 99], [1]])
    assert out.tolist() == [1, 0]


def test_vocab_limit_and_suppress_ids() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 10.0, 20.0]])
    assert sample_next(logits, GenerationConfig(temperature=0.0), vocab_limit=3).item() == 2
    assert sample_next(logits, GenerationConfig(temperature=0.0), vocab_limit=4, suppress_ids=[2, 3, 77]).item() == 1
    assert support(logits, GenerationConfig(temperature=5.0, top_p=1.0), vocab_limit=3) <= {0, 1, 2}
    sampler = Sampler(GenerationConfig(temperature=0.0), vocab_limit=4, suppress_ids=[3])
    assert sampler(logits).item() == 2


def test_seeded_reproducibility() -> None:
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    config = GenerationConfig(temperature=1.0, top_p=1.0)
    a = [sample_next(logits, config, make_generator(42)) for _ in range(2)]
    b = sample_next(logits, config, make_generator(43))
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], b)
    # A Sampler draws a fresh sequence per step, the same sequence for the same seed.
    s1, s2 = Sampler(GenerationConfig(temperature=1.0, seed=7)), Sampler(GenerationConfig(temperature=1.0, seed=7))
    steps1 = [s1(logits) for _ in range(3)]
    steps2 = [s2(logits) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(steps1, steps2, strict=True))
    assert not torch.equal(steps1[0], steps1[1])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("repetition_penalty", 0.0),
        ("seed", -1),
        ("max_new_tokens", 0),
    ],
)
def test_invalid_values_raise_naming_the_field(field: str, value: object) -> None:
    config = GenerationConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        sample_next(torch.zeros(1, 4), config)
    with pytest.raises(ValueError, match=field):
        Sampler(config)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        sample_next(torch.zeros(4), GenerationConfig())
    with pytest.raises(ValueError, match="vocab_limit"):
        sample_next(torch.zeros(1, 4), GenerationConfig(), vocab_limit=0)


def test_generation_config_defaults(tmp_path: Path) -> None:
    assert generation_config_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 7, "do_sample": False, "top_k": 20, "pad_token_id": 1})
    )
    defaults = generation_config_defaults(tmp_path)
    assert defaults == {"temperature": 0.0, "top_p": 0.95, "top_k": 20, "eos_token_id": [7], "pad_token_id": 1}
    config = default_generation_config(tmp_path, max_new_tokens=5)
    assert config.greedy and config.top_k == 20 and config.max_new_tokens == 5


@pytest.mark.skipif(not (REAL / "generation_config.json").is_file(), reason="reference checkpoint not present")
def test_generation_config_defaults_real() -> None:
    defaults = generation_config_defaults(REAL)
    assert defaults["eos_token_id"] == [200020, 199999]
    assert defaults["temperature"] == 0.6 and defaults["top_p"] == 0.95
    assert defaults["bos_token_id"] == 199999
