"""The pipeline's stages, one module each: ``run(params, ...) -> Result``.

Stages know no orchestrator (nothing here imports prefect, dvc or mlflow); experiment
tracking reaches them as a ``vaepipe.core.tracking.Tracker`` chosen by the caller.
"""
