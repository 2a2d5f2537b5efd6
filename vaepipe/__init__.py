"""vaepipe: a batch pipeline for variational autoencoder language models."""

__version__ = "0.1.0"
