"""Adapters that fit fxcache's model-agnostic core to specific libraries (diffusers)."""
