"""LangChain chat model for phi4flash."""
