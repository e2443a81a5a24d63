"""phi4flash: a native pure-PyTorch Phi-4-mini-flash-reasoning (SambaY) with a streaming engine.

The core imports torch, safetensors, tokenizers and huggingface_hub only; the web chat
(``phi4flash_demo``), the LangChain model (``langchain_phi4flash``) and the server build on the
names exported here.

    >>> engine = phi4flash.load("embedded")  # or "microsoft/Phi-4-mini-flash-reasoning", or a folder
    >>> for event in engine.stream([{"role": "user", "content": "Solve 3x + 5 = 20"}]):
    ...     print(event.channel, event.text)
"""

from typing import Any

from ._version import __version__
from .config import ConfigError, Phi4FlashConfig
from .engine import LocalEngine, collect, load
from .metrics import LatencyMetrics
from .model import Phi4FlashForCausalLM
from .protocol import Completion, Engine, GenerationConfig, Message, PromptTooLongError, StreamEvent, Usage
from .reasoning import ReasoningSplitter, split_reasoning
from .tokenizer import ChatTokenizer, IncrementalDetokenizer
from .weights import CheckpointError, load_model, save_checkpoint

__all__ = [
    "__version__",
    "ChatTokenizer",
    "CheckpointError",
    "Completion",
    "ConfigError",
    "Engine",
    "GenerationConfig",
    "IncrementalDetokenizer",
    "LatencyMetrics",
    "LocalEngine",
    "Message",
    "Phi4FlashConfig",
    "Phi4FlashForCausalLM",
    "PromptTooLongError",
    "ReasoningSplitter",
    "RemoteEngine",
    "StreamEvent",
    "Usage",
    "collect",
    "load",
    "load_model",
    "save_checkpoint",
    "split_reasoning",
]


def __getattr__(name: str) -> Any:
    # RemoteEngine lives in its own module (HTTP client code) and is imported on first use.
    if name == "RemoteEngine":
        from .remote import RemoteEngine

        return RemoteEngine
    raise AttributeError(f"module 'phi4flash' has no attribute {name!r}")
