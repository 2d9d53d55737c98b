"""Lua scripts, one file per operation; loaded with importlib.resources."""
