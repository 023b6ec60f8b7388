"""Speculation: head types and their checkpoint layouts, proposers, draft trees, acceptance rules, the adaptive policy."""
