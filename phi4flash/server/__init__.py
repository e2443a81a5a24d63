"""The OpenAI-compatible server (the ``serve`` extra): ``phi4flash.server.app.create_app``,
``phi4flash.server.cli.main`` (``phi4flash serve``) and ``phi4flash.server.ray_app`` (the ``ray`` extra).

Deliberately empty of imports, so that ``import phi4flash.server`` pulls in neither FastAPI nor Ray.
"""
