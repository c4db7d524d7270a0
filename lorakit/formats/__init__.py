"""Adapter files in other tools' formats: kohya / diffusers single files, GGUF for llama.cpp."""
