"""The vLLM engines: launching and supervising a local one, and the pool the gateway sends to."""
