"""The Headroom core: torch and plain data, no node classes, no global state.

Only `memory.comfy` knows about ComfyUI and its version differences.
"""
