"""PixelCNN priors (draft; merged into modules.py)."""
