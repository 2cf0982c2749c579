"""mashup: recycle LoRA donors. The Python API is `engine.api` (plain functions); the CLI is `engine.cli`.

Importing `engine` stays cheap (no torch, pandas or Ray): each stage imports its heavy dependencies when it runs.
"""
