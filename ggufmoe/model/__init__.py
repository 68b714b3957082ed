"""What every stage shares: tensor specs and names, and the table of ggml types."""
