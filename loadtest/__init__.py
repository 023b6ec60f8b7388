"""mtpserve load tester: speaks HTTP to any OpenAI-compatible server."""
