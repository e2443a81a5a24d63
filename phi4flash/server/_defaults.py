"""Server defaults shared by the app, the CLI and the Ray deployment (no imports, so the CLI stays light)."""

DEFAULT_MAX_QUEUE = 64  # chat requests in flight (running + waiting for a batch slot) before 429
DEFAULT_MAX_TOKENS = 4096  # completion budget when a request sets no max_tokens
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # larger request bodies get 413
