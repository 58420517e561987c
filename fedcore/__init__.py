"""fedcore: the federated-mnist library.

Model, MNIST shards, local training, evaluation, aggregation strategies, the wire format, the
worker program and its transports. Importable and testable without Prefect or MLflow: `tasks/`
and `flows/` wrap it, never the other way round.
"""

__version__ = "0.1.0"
