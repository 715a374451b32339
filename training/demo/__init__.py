"""The demo world: a tiny base model and a synthetic domain, built offline."""
