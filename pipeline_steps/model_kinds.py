"""The model kinds, their groups and their registered names: one definition, imported everywhere.

A *kind* names one trained model (its folder `train.models_dir/<kind>/`, its `metrics/<kind>.json`,
its registered model). The groups say which code handles a kind:

| group | kinds | trained by | loaded by |
|---|---|---|---|
| `CLASSIFIER_KINDS` (= `NEURAL_KINDS`) | image, text, multimodal | pipeline_steps/training.py (torch) | inference.load_classifier |
| `SKLEARN_KINDS` | text-baseline, pixel-baseline, price | pipeline_steps/baselines.py | baselines.load_sklearn_model |
| `INDEX_KINDS` | image, text, multimodal | the index stage builds one FAISS index per classifier kind | |
| `SERVED_KINDS` | image, text, multimodal, price | the package stage bundles their champions | service/bundle.py |

`model_name(prefix, kind)` is the registered model name of a kind (`registry.model_prefix`).
Standard library only (plus the project's error type), so the service and the settings schema
import it without cost.
"""

from __future__ import annotations

from pipeline_steps.errors import ConfigError

CLASSIFIER_KINDS: tuple[str, ...] = ("image", "text", "multimodal")
"""The neural category classifiers (torch, one training loop)."""
NEURAL_KINDS: tuple[str, ...] = CLASSIFIER_KINDS
INDEX_KINDS: tuple[str, ...] = CLASSIFIER_KINDS
"""The kinds with a similarity index (the classifiers' embeddings)."""

PRICE_KIND = "price"
BASELINE_KINDS: tuple[str, ...] = ("text-baseline", "pixel-baseline")
SKLEARN_KINDS: tuple[str, ...] = (*BASELINE_KINDS, PRICE_KIND)
"""The scikit-learn models (the baselines and the price estimator)."""

ALL_KINDS: tuple[str, ...] = (*SKLEARN_KINDS, *CLASSIFIER_KINDS)
"""Every model the evaluate and register stages handle, in their order."""
SERVED_KINDS: tuple[str, ...] = (*CLASSIFIER_KINDS, PRICE_KIND)
"""The models whose champions the bundle packages and the service serves."""

PRICE_CATEGORY_KIND = "text"
"""The classifier served beside the price estimator: a `/predict` with text gets its price from the
category the text classifier predicts (service/engine.py), so the price model is scored with it."""

BASELINE_BASES: tuple[str, ...] = ("image", "text", "multimodal", "price", "pixel")
"""What a `<base>-baseline` registered name may be built on."""


def model_name(prefix: str, kind: str) -> str:
    """Registered model name for a model kind.

    Args:
        prefix: `registry.model_prefix` (e.g. `marketplace`).
        kind: image|text|multimodal, price, or a baseline (`text_baseline`, `text-baseline`,
            `baseline_text`...).

    Returns:
        image|text|multimodal -> `<prefix>-<kind>-classifier`, price -> `<prefix>-price-estimator`,
        baselines -> `<prefix>-<base>-baseline`.

    Raises:
        ConfigError: for an unknown kind, naming the accepted ones.
    """
    normalised = kind.strip().lower().replace("_", "-").replace("/", "-")
    if normalised in CLASSIFIER_KINDS:
        return f"{prefix}-{normalised}-classifier"
    if normalised == PRICE_KIND:
        return f"{prefix}-{PRICE_KIND}-estimator"
    parts = [part for part in normalised.split("-") if part not in ("baseline", "baselines")]
    if normalised != "-".join(parts) and len(parts) == 1 and parts[0] in BASELINE_BASES:
        return f"{prefix}-{parts[0]}-baseline"
    accepted = list(CLASSIFIER_KINDS) + [PRICE_KIND] + [f"{base}_baseline" for base in BASELINE_BASES]
    raise ConfigError(f"unknown model kind {kind!r}; accepted: {', '.join(accepted)}")
