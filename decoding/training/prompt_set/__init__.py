"""The #24 prompt set for self-distilling draft heads: `python -m
mtpserve.decoding.training.prompt_set.build` writes training/data/prompt_set.jsonl."""
