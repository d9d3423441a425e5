"""Evaluation: metrics (``youtube8m``) and the AttentionLSTM evaluation job (``lstm``)."""
