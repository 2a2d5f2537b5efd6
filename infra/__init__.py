"""Servers for a team: PostgreSQL, the MLflow and Prefect servers and a worker.

``python -m infra.services up|down|status|purge`` (what ``make services-up`` runs).
"""
