"""Web chat for phi4flash: ``build_demo(engine) -> gr.Blocks`` and the ``phi4flash demo`` command."""

from .app import CSS, EXAMPLES, MATH_DELIMITERS, build_demo, build_error_demo

__all__ = ["CSS", "EXAMPLES", "MATH_DELIMITERS", "build_demo", "build_error_demo"]
