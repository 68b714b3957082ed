"""Writing GGUF: the streaming writer, exact file sizes before writing, Ollama Modelfiles."""
