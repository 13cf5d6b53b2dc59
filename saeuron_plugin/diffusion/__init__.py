"""diffusion adapter."""
