"""phi4flash: a native pure-PyTorch Phi-4-mini-flash-reasoning (SambaY) with a streaming engine.

The core imports torch, safetensors, tokenizers and huggingface_hub only; the web chat
(``phi4flash_demo``), the LangChain model (``langchain_phi4flash``) and the server build on the
names exported here.
"""

from ._version import __version__
from .metrics import LatencyMetrics
from .protocol import Completion, Engine, GenerationConfig, Message, PromptTooLongError, StreamEvent, Usage

__all__ = [
    "__version__",
    "Completion",
    "Engine",
    "GenerationConfig",
    "LatencyMetrics",
    "Message",
    "PromptTooLongError",
    "StreamEvent",
    "Usage",
]
