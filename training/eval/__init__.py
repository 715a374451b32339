"""The eval harness: scores what a running lorag gives its users, through its HTTP API."""
