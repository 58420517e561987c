"""Prefect flows of federated-mnist and the `fedmnist` command line."""

import os

# Before Prefect is imported: forward fedcore's and paramiko's logs into flow-run logs, and turn
# the temporary server's analytics off: offline, it logs a telemetry error on every start.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "fedcore,paramiko,tasks")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
