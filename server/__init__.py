"""mtpserve OpenAI-compatible HTTP server."""
