"""The core: the plugin contract and the machinery (see docs/architecture.md)."""
