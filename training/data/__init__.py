"""Training data: chat rows (OpenAI's fine-tuning format), their loss mask, and the data doctor."""
