"""Algorithms with no hooks and no CLI, shared by plugins and adapters (see docs/architecture.md)."""
