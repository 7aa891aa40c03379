"""The promotion policy: when does a new model version take the champion alias?

Pure functions, no MLflow: `decide(new, champion, policy)` compares two scored versions and
says what should happen and why; `pipeline_steps/registry.py:promote` reads the versions from
the registry, calls it under the promotion lock and moves the aliases.

Rules:
- the direction (higher or lower is better) belongs to the METRIC, not to the model family:
  `accuracy` and `macro_f1` go up, `log_loss` and `median_abs_error` go down, whichever model
  they score (`higher_is_better`); an unknown metric is a ConfigError, never a guess;
- the champion alias moves only to a version that beats the champion by more than
  `min_improvement` on the *same* test split (`split_hash` of the rows scored); a version
  scored on other rows is "not comparable" and becomes challenger;
- no champion yet: the new version becomes champion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline_steps import settings
from pipeline_steps.errors import ConfigError, PipelineError
from pipeline_steps.model_kinds import PRICE_KIND

# Direction of every metric the evaluate stage writes (pipeline_steps/evaluation.py), by name.
# A derived name (`median_abs_error_true_category`, `precision_at_10`) takes the direction of the
# longest base name it starts with.
HIGHER_IS_BETTER: dict[str, bool] = {
    "accuracy": True,
    "top3_accuracy": True,
    "macro_f1": True,
    "weighted_f1": True,
    "f1": True,
    "precision": True,
    "recall": True,
    "r2_log": True,
    "category_accuracy": True,
    "ndcg": True,
    "mrr": True,
    "log_loss": False,
    "median_abs_error": False,
    "mae": False,
    "rmse": False,
    "mse": False,
    "baseline_mae": False,
    "baseline_median_abs_error": False,
}


class PromotionError(PipelineError):
    """Two versions cannot be compared as asked (a version without the promotion metric)."""


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` means a better model.

    Args:
        metric: a metric name as the evaluate stage writes it (`accuracy`, `log_loss`,
            `median_abs_error`, ...), optionally with a suffix (`median_abs_error_true_category`).

    Returns:
        True for scores (accuracy, F1, R²), False for losses and errors. The direction comes
        from the metric alone, so `classifier_metric: log_loss` promotes lower log-losses.

    Raises:
        ConfigError: for a metric this table does not know; guessing a direction would promote
        worse models half of the time.
    """
    name = str(metric).strip().lower()
    for base in sorted(HIGHER_IS_BETTER, key=len, reverse=True):
        if name == base or name.startswith(base + "_") or name.startswith(base + "@"):
            return HIGHER_IS_BETTER[base]
    accepted = ", ".join(sorted(HIGHER_IS_BETTER))
    raise ConfigError(f"no known direction for metric {metric!r} (is higher or lower better?); accepted: {accepted}")


def is_price_kind(kind: str) -> bool:
    """The price estimator (and its baselines) versus the classifiers: they read different params keys."""
    return PRICE_KIND in kind.lower()


@dataclass(frozen=True)
class PromotionPolicy:
    """How one model kind is judged: the metric, its direction, the margin and the two aliases."""

    metric: str
    higher_is_better: bool
    min_improvement: float = 0.0
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"

    @classmethod
    def from_params(cls, registry_params: Mapping[str, Any], kind: str) -> PromotionPolicy:
        """The policy of a model kind from params.yaml `registry:`.

        Args:
            registry_params: `registry:` with `promotion.{classifier,price}_metric`, the per-family
                margins `promotion.{classifier,price}_min_improvement` (an accuracy point and a pound
                are different margins) and the `champion_alias`/`challenger_alias` names.
            kind: the model kind; `price` reads the price keys, every other kind the classifier ones.

        Returns:
            The policy, its direction taken from the metric (`higher_is_better`).
        """
        promotion = settings.section(settings.PromotionSettings, registry_params["promotion"], "registry.promotion")
        family = "price" if is_price_kind(kind) else "classifier"
        metric = str(getattr(promotion, f"{family}_metric"))
        return cls(
            metric=metric,
            higher_is_better=higher_is_better(metric),
            min_improvement=float(getattr(promotion, f"{family}_min_improvement")),
            champion_alias=str(registry_params["champion_alias"]),
            challenger_alias=str(registry_params["challenger_alias"]),
        )

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `registry.promote` (metric, direction, margin, aliases)."""
        return asdict(self)


def promotion_settings(registry_params: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The `registry.promote()` keyword arguments for a model kind (see PromotionPolicy.from_params)."""
    return PromotionPolicy.from_params(registry_params, kind).as_kwargs()


def split_hash(ids: Iterable[Any]) -> str:
    """A stable hash of the scored rows' ids (order does not matter): the `test_split_hash` tag.

    Two versions are only compared when their numbers come from the same rows.
    """
    joined = "\n".join(sorted(str(item) for item in ids))
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Standing:
    """One registered version as promotion sees it: its value of the policy's metric and its split."""

    version: str
    value: float | None
    split: str | None


@dataclass
class PromotionDecision:
    """What promote() did. `champion_version`/`champion_value`: the champion before the decision."""

    promoted: bool
    reason: str
    new_value: float | None
    champion_version: str | None
    champion_value: float | None
    name: str | None = None
    version: str | None = None
    alias: str | None = None  # the alias the new version received

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(new: Standing, champion: Standing | None, policy: PromotionPolicy) -> PromotionDecision:
    """Whether `new` should take the champion alias from `champion`, and why (a sentence with both values).

    Args:
        new: the version being judged; its value must be a finite number.
        champion: the current champion, or None when there is none yet.
        policy: metric, direction, margin and alias names.

    Returns:
        A PromotionDecision (promoted or not, the reason, both values); `name`, `version`
        and `alias` are left for the caller, who applies the decision to the registry.
    """
    if new.value is None:
        raise PromotionError(f"version {new.version} has no recorded {policy.metric!r}: it cannot be judged")
    metric, alias = policy.metric, policy.champion_alias
    if champion is None:
        return PromotionDecision(
            True, f"no {alias} yet: version {new.version} ({metric}={new.value:.6g}) becomes {alias}", new.value, None, None
        )
    if champion.version == new.version:
        return PromotionDecision(
            False, f"version {new.version} already is the {alias}", new.value, champion.version, champion.value
        )
    new_label = f"version {new.version} {metric}={new.value:.6g}"
    if champion.value is None:
        return PromotionDecision(
            False,
            f"not comparable: {alias} version {champion.version} has no recorded {metric!r} "
            f"({new_label}); re-evaluate the {alias} or move the alias by hand",
            new.value, champion.version, None,
        )
    champ_label = f"{alias} version {champion.version} {metric}={champion.value:.6g}"
    if new.split != champion.split:
        return PromotionDecision(
            False,
            f"not comparable: evaluated on different test splits (test_split_hash {new.split or 'unknown'} vs "
            f"{champion.split or 'unknown'}); {new_label}, {champ_label}; re-evaluate both on one split",
            new.value, champion.version, champion.value,
        )
    improvement = (new.value - champion.value) if policy.higher_is_better else (champion.value - new.value)
    direction = "higher" if policy.higher_is_better else "lower"
    if improvement > policy.min_improvement:
        return PromotionDecision(
            True,
            f"{new_label} beats {champ_label} by {improvement:.6g} ({direction} is better, "
            f"min_improvement={policy.min_improvement:g})",
            new.value, champion.version, champion.value,
        )
    return PromotionDecision(
        False,
        f"{new_label} does not beat {champ_label} by more than min_improvement={policy.min_improvement:g} "
        f"({direction} is better; improvement {improvement:.6g})",
        new.value, champion.version, champion.value,
    )


# The keys the evaluate stage writes into metrics/<model>.json beside the numbers: which trained
# model (its MLflow run) and which rows (their split_hash) the numbers describe.
MODEL_RUN_KEY = "model_run_id"
SPLIT_HASH_KEY = "test_split_hash"
# For the price model, scored with the category a classifier predicts: that classifier's run.
# A champion scored with another one is re-scored before the comparison, like one scored on other rows.
CATEGORY_MODEL_KEY = "category_model_run_id"


def checked_split_hash(kind: str, model_dir: Any, trained_in: str | None, source: Any, metrics: Mapping[str, Any]) -> str:
    """The test-split hash of an evaluate metrics file, once it is clear those numbers score this very model.

    Args:
        kind: the model kind (for the message).
        model_dir: the trained model's directory (for the message).
        trained_in: the MLflow run that trained the model about to be registered (its run_id.txt).
        source: the metrics file (for the message).
        metrics: the evaluate stage's metrics/<kind>.json, read.

    Returns:
        The split hash the numbers were computed on (the `test_split_hash` version tag).

    Raises:
        PipelineError: when the file names no run or rows (an older evaluate wrote it) or another
        run: a model retrained since would otherwise be registered with its predecessor's numbers.
    """
    scored_run, split = metrics.get(MODEL_RUN_KEY), metrics.get(SPLIT_HASH_KEY)
    again = f"run `python -m flows.evaluate --model {kind}` (or `dvc repro evaluate`) first"
    if not scored_run or not split:
        raise PipelineError(f"{source} does not say which model and test rows it scored (an older evaluate wrote it): {again}")
    if scored_run != trained_in:
        raise PipelineError(
            f"{source} scores the {kind} model of run {scored_run}, but {model_dir} was trained in run {trained_in}: {again}"
        )
    return str(split)
