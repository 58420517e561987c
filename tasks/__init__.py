"""Prefect tasks: thin wrappers that call fedcore and add retries, names and logging."""
