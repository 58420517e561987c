"""Prefect artifacts of a training: progress, one table per evaluation, the MLflow link, a summary.

They make the Prefect UI answer "how far is it, how good is it, where is the record" without
opening the logs. Each call is one small API request; none carries tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from fedcore.evaluation import EvalResult
from fedcore.report import model_label
from fedcore.shards import format_labels


def evaluation_rows(
    results: Mapping[str, EvalResult], groups: Sequence[Sequence[int]]
) -> list[dict[str, Any]]:
    """One row per model: the seed's figures (shares per group, average loss, accuracy)."""
    rows = []
    for model, r in results.items():
        row: dict[str, Any] = {"model": model_label(model)}
        for g, share in zip(groups, r.group_shares):
            row[f"predicted {format_labels(g)}"] = f"{100 * share:.0f}%"
        row["average loss"] = f"{r.seed_loss:.4f}"
        row["accuracy"] = f"{r.correct}/{r.total} ({100 * r.accuracy:.2f}%)"
        rows.append(row)
    return rows


class RunArtifacts:
    """The artifacts of one flow run."""

    def __init__(self, name: str, total_rounds: int) -> None:
        self.total = total_rounds
        self.name = name
        # The flow's code is synchronous, so Prefect runs the synchronous variant: a UUID.
        self.progress = cast(
            UUID,
            create_progress_artifact(
                0.0, key=f"{_key(name)}-progress", description=f"{name}: round 0 of {total_rounds}"
            ),
        )

    def round_done(self, rnd: int) -> None:
        update_progress_artifact(
            self.progress,
            100.0 * rnd / self.total,
            description=f"{self.name}: round {rnd} of {self.total}",
        )

    def evaluation(
        self, rnd: int, results: Mapping[str, EvalResult], groups: Sequence[Sequence[int]]
    ) -> None:
        create_table_artifact(
            evaluation_rows(results, groups),
            key=f"{_key(self.name)}-evaluation-r{rnd:03d}",
            description=f"{self.name}: evaluation at round {rnd} of {self.total}",
        )

    def fleet(self, rows: list[dict[str, Any]]) -> None:
        """Per device, under a non-sync schedule: jobs, updates contributed, how stale they
        were, what was dropped, idle time."""
        create_table_artifact(
            rows,
            key=f"{_key(self.name)}-devices",
            description=f"{self.name}: what each device contributed, and how stale",
        )

    def mlflow_link(self, url: str) -> None:
        create_link_artifact(
            url,
            link_text="MLflow run",
            key=f"{_key(self.name)}-mlflow-run",
            description="The MLflow record of this training",
        )

    def summary(self, markdown: str) -> None:
        create_markdown_artifact(
            markdown, key=f"{_key(self.name)}-summary", description=f"{self.name}: summary"
        )


def _key(name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    out = "".join(c if c.isalnum() else "-" for c in name.lower())
    return out.strip("-") or "training"


def summary_markdown(summary: Mapping[str, Any], strategy: str, mlflow_url: str | None) -> str:
    """The end-of-training summary: accuracy per evaluated round and model."""
    evals: Mapping[int, Mapping[str, float]] = summary.get("evaluations", {})
    models = sorted(
        {m for accs in evals.values() for m in accs}, key=lambda m: (m == "federated", m)
    )
    lines = [
        f"# {summary.get('name', 'training')}: {summary['rounds']} rounds, strategy `{strategy}`",
        "",
    ]
    final = summary.get("final_accuracy")
    if final is not None:
        lines += [
            f"**Federated model: {100 * final:.2f}% test accuracy at round {summary['rounds']}.**",
            "",
        ]
    if evals:
        lines.append("| round | " + " | ".join(model_label(m) for m in models) + " |")
        lines.append("|---|" + "---|" * len(models))
        for rnd, accs in sorted(evals.items()):
            cells = [f"{100 * accs[m]:.2f}%" if m in accs else "" for m in models]
            lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
    if mlflow_url:
        lines += ["", f"MLflow run: {mlflow_url}"]
    return "\n".join(lines)
