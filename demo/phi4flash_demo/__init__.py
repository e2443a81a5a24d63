"""Web chat for phi4flash."""
