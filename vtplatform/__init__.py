"""vtplatform: Ray-distributed video feature extraction, tagging and fine-tuning on PaddlePaddle."""

__version__ = "0.1.0"
