"""Training on Ray Train: the Paddle backend (``backend``), checkpoints (``checkpoint``), and the
AttentionLSTM fine-tune (``lstm``)."""
