"""HF transformers and GGUF, both ways."""
