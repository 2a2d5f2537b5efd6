"""The model and what is computed from it: batches, the VAE, estimators, checkpoints.

Imports torch, numpy and pyarrow, and vaepipe.core; never a tracker, an orchestrator or a stage.
"""
