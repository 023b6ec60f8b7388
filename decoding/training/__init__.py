"""Training draft heads: train-heads in its three modes, the data recipe and its prompt files."""
