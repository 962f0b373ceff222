"""Loading GGUF files, the model, generation, the CLIs and the model store."""
