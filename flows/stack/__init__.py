"""The stack past one machine: a PostgreSQL cluster, a Prefect server and an MLflow tracking
server on it, each on 127.0.0.1 with its port, log and pid file under `$FEDMNIST_HOME/stack/`.

`layout` (paths, ports, the database password), `postgres` (the cluster as an unprivileged
user), `services` (the two HTTP servers as detached, health-checked processes), `control`
(`up`, `down`, `status`) and `cli` (`fedmnist stack ...`).
"""
