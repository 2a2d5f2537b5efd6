"""Prefect flows and deployments: wiring only; stage logic lives in vaepipe/."""
