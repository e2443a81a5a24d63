"""LangChain chat model for phi4flash: ``from langchain_phi4flash import ChatPhi4Flash``."""

from phi4flash import __version__

from .chat_models import ChatPhi4Flash, get_engine, to_engine_messages

__all__ = ["ChatPhi4Flash", "__version__", "get_engine", "to_engine_messages"]
