"""Helpers shared by the web chat tests: read the latency panel and the chat messages."""

from __future__ import annotations

import re
from typing import Any


def parse_stats(stats_html: str) -> dict[str, str]:
    """The latency panel's values by ``data-metric`` key (plus "phase"), as displayed."""
    values = dict(re.findall(r'data-metric="([a-z]+)">([^<]*)<', stats_html))
    phase = re.search(r'data-phase="([^"]*)"', stats_html)
    values["phase"] = phase.group(1) if phase else ""
    return values


def number(text: str) -> float:
    """The first number in a displayed value: "1,234 ms" -> 1234.0."""
    match = re.search(r"-?[\d,]+(?:\.\d+)?", text)
    assert match, f"no number in {text!r}"
    return float(match.group(0).replace(",", ""))


def title(message: dict[str, Any]) -> str:
    """A chat message's metadata title ("" for a plain answer)."""
    return str((message.get("metadata") or {}).get("title") or "")


def answers(messages: list[dict[str, Any]]) -> list[str]:
    """The plain answer texts among ``messages`` (thoughts and notes carry a title)."""
    return [str(m.get("content") or "") for m in messages if not title(m)]
