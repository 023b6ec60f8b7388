"""The model: config of the trunk, checkpoint formats, tokenizer, the trunk, weight formats and kernels, attention, KV cache, device choice."""
