"""eval adapter."""
