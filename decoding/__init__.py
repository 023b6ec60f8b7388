"""mtpserve decoding engine: Llama-family trunk, KV cache, speculative decoding."""
