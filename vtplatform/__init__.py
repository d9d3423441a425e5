"""vtplatform: Ray-distributed video feature extraction, tagging and fine-tuning on PaddlePaddle."""

import warnings

__version__ = "0.1.0"

# Paddle warns on every import that ccache (a C++ compiler cache, for building custom operators)
# is missing: noise in every driver and Ray worker, none of which compiles anything. Installed
# here, before any of our modules imports paddle, so that Ray workers (which unpickle our
# functions and import this package first) drop it too. Every other warning is kept.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
