"""Training on Ray Train: the Paddle backend (``backend``), checkpoints (``checkpoint``), and the
fine-tunes of the AttentionLSTM (``lstm``) and of TSN (``tsn``)."""
