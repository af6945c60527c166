"""VQ-VAE and PixelCNN priors for brain MRI slices (Keras 3). Nothing runs on import."""

# --- priors: merged from _prior_draft.py before release (temporary during development) ---
from _prior_draft import *  # noqa: F401,F403
