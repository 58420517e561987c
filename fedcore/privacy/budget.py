"""The coordinator's privacy budget across a training: who may train, what each round spent.

Per round of the sync loop, with DP-SGD on (`privacy.enabled`):

1. before the round, `admit` asks the ledger whether one more round of the plan would take each
   device past `privacy.target_epsilon`; such a device is stopped for the rest of the training
   (`on_budget_spent: stop-device`), or the training ends with `PrivacyBudgetSpent`
   (`stop-training`). It ends too when fewer devices keep budget than the round's quorum needs,
   since no later round could reach it either. So no device ever ends above its stated epsilon;
2. after the round, `charge` records the round's steps for every device that was SENT a train
   request, whether or not its update came back or was accepted: a device that trained and then
   dropped has spent its budget all the same (and the coordinator cannot tell it did not train);
3. `metrics` gives `epsilon/<device>` for the tracker; `state_dict`/`load_state_dict` carry the
   ledger and the stopped devices across a resume; `statement` is the guarantee in words.

A device's sampling rate is the plan's batch size over its example count, which the coordinator
knows from the device's hello (`labels.numel()` on the device, which is also what the device's
Poisson sampling uses). A device whose count is unknown is charged as if it sampled every
example each step (rate 1): an overstatement of its epsilon, never an understatement.

Coordinator only (Python 3.11, `dp-accounting` through fedcore.privacy.accountant).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..privacy_config import PrivacyConfig
from ..training import TrainPlan
from .accountant import NAME, DeviceLedger
from .errors import PrivacyBudgetSpent


class PrivacyBudget:
    """Epsilon per device, the devices stopped by their budget, and the rules that stop them.

    Args:
        config: the experiment's `privacy:` section (enabled).
        trainers: every trainer of the training, in the config's order.
    """

    def __init__(self, config: PrivacyConfig, trainers: Iterable[str]) -> None:
        if not config.enabled:
            raise ValueError("PrivacyBudget needs privacy.enabled")
        self.config = config
        self.trainers = list(trainers)
        self.ledger = DeviceLedger(config.delta, config.target_epsilon)
        self.stopped: dict[str, int] = {}  # device -> the first round it was kept out of

    @staticmethod
    def sample_rate(plan: TrainPlan, examples: int | None) -> float:
        """q = batch size / the device's examples (1 when the count is unknown), at most 1."""
        if examples is None or examples < 1:
            return 1.0
        return min(1.0, plan.batch_size / examples)

    def admit(
        self, round: int, plan: TrainPlan, examples: Mapping[str, int | None], quorum: int
    ) -> list[str]:
        """The trainers that may train in `round` within their budget, in the config's order.

        Args:
            plan: the round's plan (its steps, batch size and noise multiplier).
            examples: each trainer's example count from its hello (None: unknown).
            quorum: the valid updates the round needs (`ExperimentConfig.required_updates`).

        Raises:
            PrivacyBudgetSpent: a device's budget is spent under `stop-training`, or fewer
                devices than `quorum` have budget left.
        """
        spent = []
        for name in self.trainers:
            if name in self.stopped:
                continue
            q = self.sample_rate(plan, examples.get(name))
            if self.ledger.would_exceed(name, plan.steps, q, plan.dp_noise_multiplier):
                spent.append(name)
        if spent and self.config.on_budget_spent == "stop-training":
            raise PrivacyBudgetSpent(
                f"round {round}: the privacy budget of {', '.join(spent)} is spent (epsilon "
                f"{self._eps(spent)} now; one more round would pass privacy.target_epsilon "
                f"{self.config.target_epsilon:g} at delta {self.config.delta:g}), and "
                "privacy.on_budget_spent is stop-training: the training ends here with the "
                "model of the last round. Raise target_epsilon or noise_multiplier, or train "
                "fewer rounds, for a longer training"
            )
        for name in spent:
            self.stopped[name] = round
        admitted = [n for n in self.trainers if n not in self.stopped]
        if len(admitted) < quorum:
            raise PrivacyBudgetSpent(
                f"round {round}: only {len(admitted)} device(s) have privacy budget left "
                f"({', '.join(admitted) or 'none'}; stopped: {', '.join(self.stopped)}), "
                f"the quorum is {quorum}: the training ends here with the model of the last "
                "round. Lower the quorum, or raise privacy.target_epsilon or noise_multiplier"
            )
        return admitted

    def newly_stopped(self, round: int) -> list[str]:
        """The devices `admit` stopped at `round` (for the round's log line)."""
        return [n for n, r in self.stopped.items() if r == round]

    def charge(
        self, plan: TrainPlan, sent: Iterable[str], examples: Mapping[str, int | None]
    ) -> dict[str, float]:
        """Record the round for every device in `sent` (asked to train); their epsilon after."""
        out = {}
        for name in sent:
            q = self.sample_rate(plan, examples.get(name))
            out[name] = self.ledger.record(name, plan.steps, q, plan.dp_noise_multiplier)
        return out

    def epsilon(self, device: str) -> float:
        return self.ledger.epsilon(device)

    def metrics(self) -> dict[str, float]:
        """`epsilon/<device>` for every trainer (0 before its first round)."""
        return {f"epsilon/{n}": self.ledger.epsilon(n) for n in self.trainers}

    def _eps(self, names: list[str]) -> str:
        return ", ".join(f"{n} {self.ledger.epsilon(n):.3g}" for n in names)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the ledger's history and the stopped devices."""
        return {"ledger": self.ledger.state_dict(), "stopped": dict(self.stopped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`'s output (a resume).

        Raises:
            ValueError: the state was written under another delta or budget, or is malformed.
        """
        try:
            ledger = DeviceLedger.from_state(dict(state["ledger"]))
            stopped = {str(k): int(v) for k, v in dict(state["stopped"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"privacy budget state is malformed: {exc!r}") from None
        if ledger.delta != self.config.delta:
            raise ValueError(
                f"the privacy ledger was kept at delta {ledger.delta:g}, the config says "
                f"{self.config.delta:g}: epsilons at two deltas do not compose; resume with "
                "the recorded config"
            )
        ledger.target_epsilon = self.config.target_epsilon
        self.ledger, self.stopped = ledger, stopped

    def statement(self) -> str:
        """The guarantee in words, for the run's description."""
        c = self.config
        stop = (
            "a device whose next round would pass the budget trains no more"
            if c.on_budget_spent == "stop-device"
            else "the training ends before any device's next round would pass the budget"
        )
        return (
            "Example-level differential privacy, per device: each device's training examples "
            f"are protected with (epsilon, delta) = (at most {c.target_epsilon:g}, {c.delta:g}) "
            f"against anyone who sees its model updates, the coordinator included. DP-SGD on the "
            f"device: per-example gradients clipped to L2 norm {c.max_grad_norm:g}, Gaussian "
            f"noise of {c.noise_multiplier:g} x that norm, Poisson-sampled batches, noise and "
            f"sample drawn from the device's own entropy. Epsilon counted by {NAME} on the "
            f"coordinator after every round, logged as epsilon/<device>; {stop}. It bounds what "
            "can be learnt about any single example, not about a device's data as a whole."
        )
