"""vlm adapter."""
