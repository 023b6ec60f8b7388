"""Tools on top of the engine: bench, export, the command-line entry points."""
