"""Hugging Face checkpoints -> GGUF (llama.cpp's two-file layout or Ollama's one file)."""
