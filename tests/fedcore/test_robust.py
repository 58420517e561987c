"""The robust rules against hand-computed numbers: median, trimmed mean and clipped mean each give
what the paper's formula gives, and nothing a mean would."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fedcore.errors import UpdateRejected
from fedcore.protocol import Update
from fedcore.strategies import StrategyConfig, build_strategy
from fedcore.strategies.aggregate import (
    clip_to_norm,
    coordinate_median,
    trim_count,
    trimmed_mean,
)
from fedcore.training import TrainMetrics


def _u(worker: str, values: list[float], n: int = 1) -> Update:
    return Update(worker, 1, {"w": torch.tensor(values)}, n, TrainMetrics(0.0, n, 1, 0.0))


def _agg(config: dict, values: list[list[float]], start: list[float], ns=None) -> list[float]:
    s = StrategyConfig.model_validate(config).root.build()
    ups = [_u(f"w{i}", v, (ns or [1] * len(values))[i]) for i, v in enumerate(values)]
    return s.aggregate(1, {"w": torch.tensor(start)}, ups, [])["w"].tolist()


ONE_OUTLIER = [[1.0], [2.0], [100.0]]


def test_median_and_trimmed_mean_of_one_outlier() -> None:
    assert _agg({"name": "median"}, ONE_OUTLIER, [0.0]) == [2.0]
    assert _agg({"name": "trimmed-mean", "beta": 1 / 3}, ONE_OUTLIER, [0.0]) == [2.0]
    assert _agg({"name": "trimmed-mean"}, ONE_OUTLIER, [0.0]) == [2.0]  # default beta 1/3
    assert _agg({"name": "trimmed-mean", "beta": 0.2}, ONE_OUTLIER, [0.0]) == pytest.approx(
        [103 / 3]  # floor(0.2 x 3) = 0: nothing trimmed, the mean
    )
    assert _agg({"name": "mean"}, ONE_OUTLIER, [0.0]) == pytest.approx([103 / 3])


def test_rules_are_coordinate_wise_and_keep_dtype() -> None:
    models = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, 20.0])}]
    models.append({"w": torch.tensor([100.0, -5.0])})
    assert coordinate_median(models)["w"].tolist() == [2.0, 10.0]
    assert trimmed_mean(models, 1 / 3)["w"].tolist() == [2.0, 10.0]
    half = [{"w": torch.tensor([1.0], dtype=torch.float16)}, {"w": torch.tensor([4.0]).half()}]
    out = coordinate_median(half)["w"]
    assert out.dtype == torch.float16 and out.item() == 2.5  # even count: the middle two's mean


def test_even_counts_and_trim_counts() -> None:
    four = [[1.0], [2.0], [3.0], [100.0]]
    assert _agg({"name": "median"}, four, [0.0]) == [2.5]
    assert _agg({"name": "trimmed-mean", "beta": 0.25}, four, [0.0]) == [2.5]  # drops 1 and 100
    assert _agg({"name": "median"}, [[1.0], [3.0]], [0.0]) == [2.0]  # two: their mean
    assert [trim_count(n, 1 / 3) for n in (1, 2, 3, 4, 6, 9)] == [0, 0, 1, 1, 2, 3]
    assert trim_count(4, 0.49) == 1  # never leaves nothing to average
    with pytest.raises(ValueError, match="0 <= beta < 0.5"):
        trim_count(3, 0.5)


def test_clipped_mean_by_hand() -> None:
    # start 0: update norms 1, 2, 100; median 2 -> the 100 becomes 2: (1 + 2 + 2) / 3
    assert _agg(
        {"name": "clipped-mean", "weighting": "unweighted"}, ONE_OUTLIER, [0.0]
    ) == pytest.approx([5 / 3])
    # clipping comes before the weighting: (1 x 1 + 2 x 1 + 2 x 2) / 4
    assert _agg(
        {"name": "clipped-mean", "weighting": "samples"}, ONE_OUTLIER, [0.0], [1, 1, 2]
    ) == pytest.approx([7 / 4])
    # a fixed bound M = 0.5 around the start 1: deltas 0, 1, 99 -> 0, 0.5, 0.5
    assert _agg(
        {"name": "clipped-mean", "weighting": "unweighted", "bound": 0.5}, ONE_OUTLIER, [1.0]
    ) == pytest.approx([1 + 1 / 3])
    # a delta of norm 5 in 2-D clipped to 2.5 keeps its direction
    out = clip_to_norm({"w": torch.tensor([3.0, 4.0])}, {"w": torch.zeros(2)}, 5.0, 2.5)
    assert out["w"].tolist() == pytest.approx([1.5, 2.0])
    inside = {"w": torch.tensor([0.3, 0.4])}
    assert clip_to_norm(inside, {"w": torch.zeros(2)}, 0.5, 2.5)["w"] is inside["w"]


def test_median_composes_with_server_momentum() -> None:
    s = StrategyConfig.model_validate({"name": "median", "momentum": 0.9}).root.build()
    x1 = s.aggregate(1, {"w": torch.tensor([0.0])}, [_u("a", [1.0]), _u("b", [2.0])], [])
    assert x1["w"].item() == pytest.approx(1.5)  # first SGD step: the median itself
    ups = [_u("a", [3.0]), _u("b", [4.0]), _u("c", [-50.0])]
    x2 = s.aggregate(2, x1, ups, [])  # median 3; g = 1.5 - 3; buf = 0.9 x -1.5 + -1.5
    assert x2["w"].item() == pytest.approx(1.5 + 0.9 * 1.5 + 1.5)


def test_configs_name_their_rule_and_refuse_what_does_not_fit() -> None:
    assert build_strategy("median").params()["rule"] == "coordinate-median"
    params = build_strategy("trimmed-mean").params()
    assert params["beta"] == pytest.approx(1 / 3) and "Yin et al. 2018" in str(params["paper"])
    clipped = StrategyConfig.model_validate({"name": "clipped-mean", "weighting": "samples"})
    assert "Sun et al. 2019" in str(clipped.root.build().params()["paper"])
    for bad in (
        {"name": "trimmed-mean", "beta": 0.5},
        {"name": "median", "weighting": "samples"},  # a count would buy a say again
        {"name": "clipped-mean"},  # the weighting is always named
        {"name": "clipped-mean", "weighting": "unweighted", "bound": 0},
        {"name": "median", "momentun": 0.9},
    ):
        with pytest.raises(ValidationError):
            StrategyConfig.model_validate(bad)


def test_robust_strategies_check_counts_too() -> None:
    for name in ("median", "trimmed-mean"):
        with pytest.raises(UpdateRejected, match="num_examples -12000"):
            build_strategy(name).aggregate(
                1, {"w": torch.zeros(1)}, [_u("a", [1.0]), _u("b", [2.0], -12000)], []
            )


def test_centered_clipping_by_hand() -> None:
    centered = {"name": "clipped-mean", "weighting": "unweighted", "center": "median"}
    # center: the median 2; distances 1, 0, 98, bound their median 1: 100 -> 2 + 98 / 98
    assert _agg(centered, ONE_OUTLIER, [0.0]) == pytest.approx([(1 + 2 + 3) / 3])
    # a flipped update of honest size: clipping around the global model keeps its direction,
    # clipping around the round's median pulls it back to an honest distance from the others
    s = StrategyConfig.model_validate(centered).root.build()
    ups = [_u("a", [1.0, 0.0]), _u("b", [1.0, 0.2]), _u("c", [-1.0, -0.1])]
    out = s.aggregate(1, {"w": torch.zeros(2)}, ups, [])["w"].tolist()
    scale = 0.2 / (2.0**2 + 0.1**2) ** 0.5  # deltas from (1, 0): 0, 0.2, 2.0025; bound 0.2
    assert out == pytest.approx([1 + (-2 * scale) / 3, (0.2 - 0.1 * scale) / 3])
    plain = StrategyConfig.model_validate({"name": "clipped-mean", "weighting": "unweighted"})
    flipped = plain.root.build().aggregate(1, {"w": torch.zeros(2)}, ups, [])["w"].tolist()
    assert flipped[0] < 0.34 < out[0]  # the plain clip lets the flip cancel a third of the step
    # no attacker and every delta within the bound: exactly the mean
    assert _agg(centered, [[1.0], [2.0], [3.0]], [0.0]) == pytest.approx([2.0])
    params = s.params()
    assert params["rule"] == "centered-clipped-mean" and "Karimireddy" in str(params["paper"])
    with pytest.raises(ValidationError):
        StrategyConfig.model_validate({**centered, "center": "mean"})


def test_centered_clipping_iterations_and_radius_by_hand() -> None:
    # honest a = (1, 0) and b = (0, 1), the attacker far the other way; the coordinate-wise
    # median is (0, 0), the honest mean (0.5, 0.5)
    values = [[1.0, 0.0], [0.0, 1.0], [-4.0, -4.0]]
    centered = {"name": "clipped-mean", "weighting": "unweighted", "center": "median"}
    r = 2**-0.5
    # one step: distances 1, 1, 4 sqrt 2, bound 1: the attacker becomes (-r, -r)
    v1 = (1 - r) / 3
    assert _agg(centered, values, [0.0, 0.0]) == pytest.approx([v1, v1])
    # a second step from v1: a and b are sqrt((1 - v1)^2 + v1^2) away, the new bound; the
    # attacker is clipped to that distance from v1 along (-r, -r)
    bound2 = ((1 - v1) ** 2 + v1**2) ** 0.5
    v2 = v1 + ((1 - v1) + (0 - v1) + (-bound2 * r)) / 3
    two = _agg({**centered, "iterations": 2}, values, [0.0, 0.0])
    assert two == pytest.approx([v2, v2]) and v2 == pytest.approx((1 + v1 - bound2 * r) / 3)
    assert 0 < v1 < v2 < 0.5  # each step nearer the honest mean
    # radius 0.5: every update clipped to 0.5 from the median, the honest ones too
    half = _agg({**centered, "radius": 0.5}, values, [0.0, 0.0])
    assert half == pytest.approx([(0.5 - 0.5 * r) / 3] * 2)
    # no attacker and every delta within the bound: every step gives the mean again
    assert _agg({**centered, "iterations": 3}, [[1.0], [2.0], [3.0]], [0.0]) == pytest.approx([2.0])


def test_clipping_options_are_named_and_checked() -> None:
    config = {"name": "clipped-mean", "weighting": "unweighted", "center": "median"}
    params = StrategyConfig.model_validate({**config, "iterations": 3, "radius": 0.5})
    shown = params.root.build().params()
    assert (shown["iterations"], shown["radius"], shown["bound"]) == (3, 0.5, "median")
    plain = StrategyConfig.model_validate(config).root.build().params()
    assert "iterations" not in plain and "radius" not in plain  # the defaults, as recorded before
    for bad, word in (
        ({**config, "iterations": 0}, "iterations"),
        ({**config, "radius": 0}, "radius"),
        ({**config, "radius": 1.5}, "radius"),
        ({**config, "radius": 0.5, "bound": 2.0}, "scales the median bound"),
        ({**config, "center": "global", "iterations": 2}, "need center: median"),
    ):
        with pytest.raises(ValidationError, match=word):
            StrategyConfig.model_validate(bad)
