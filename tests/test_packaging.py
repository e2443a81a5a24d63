"""Packaging hygiene: the licence as an SPDX expression, and a test run whose output is not buried in
warnings from other libraries (while warnings about our own code still show)."""

from __future__ import annotations

import warnings
from importlib.metadata import metadata

import pytest
from _pytest.config import parse_warning_filter


def test_the_license_is_an_spdx_expression() -> None:
    meta = metadata("phi4flash")
    assert meta.get("License-Expression") == "MIT"  # PEP 639; the old {text = ...} table is deprecated
    assert meta.get("License") is None


def test_the_suite_hides_gradios_pandas_deprecation_but_not_ours(request: pytest.FixtureRequest) -> None:
    queueing = pytest.importorskip("gradio.queueing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for line in request.config.getini("filterwarnings"):  # the suite's filters, as pytest applies them
            warnings.filterwarnings(*parse_warning_filter(line, escape=False))
        queueing.Queue._get_df([{"a": 1.0}, {"a": None}])  # what gradio's queue runs after each event
        warnings.warn("a deprecation of ours", DeprecationWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("copy keyword" in m or "no_silent_downcasting" in m for m in messages), messages
    assert "a deprecation of ours" in messages  # the filters are scoped to gradio's warnings


def test_the_suite_prints_no_benchmark_table(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("pytest_benchmark")
    assert request.config.getoption("benchmark_disable")  # langchain-tests' test_init_time runs once, untimed
