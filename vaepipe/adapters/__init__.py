"""Adapters to the outside: MLflow tracking and the registered MLflow model.

The only modules of vaepipe that import mlflow; the stages see them through the Tracker protocol.
"""
