"""Behavioural tests of the text classifiers (Made-With-ML's "model" tests), beside the accuracy numbers.

Accuracy says how often a model is right on the test split; these say whether it is right for
the right reasons, on perturbations whose effect we know in advance:

- invariance: a listing's predicted category does not change when its price or its town
  changes, neither through the listing's own fields (price, location, and the
  "| in Town, County | Gumtree" tail real exports add to names) nor when the seller writes
  them into the description;
- direction: adding "iPhone 12 unlocked" to a listing moves probability towards
  "Phones, Mobile Phones & Telecoms", for every listing of the test split.

The models are the pipeline's own (the served neural text classifier, frozen MiniLM + head
with the TF-IDF wide branch, and the TF-IDF + logistic-regression text baseline), trained
with the pipeline's training functions on the generated sample (pipeline_steps/sample_data.py:
the 13 real root categories, towns in some descriptions), after the real validate and clean
steps. The service's tiny test bundle (tests/conftest.py `bundle_dir`) has three categories
and no phones, so it cannot carry the directional test. Fixed seeds, CPU, one thread: about a
minute.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_steps import baselines, inference, training
from pipeline_steps.cleaning import clean_dataset, clean_products
from pipeline_steps.config import load_params
from pipeline_steps.sample_data import format_price, generate_sample
from pipeline_steps.validation import validate_raw

PHONES = "Phones, Mobile Phones & Telecoms"
PHONE_WORDS = "iPhone 12 unlocked"
TOWNS = (("Leeds", "West Yorkshire"), ("Bristol", "Bristol"), ("Aberdeen", "Aberdeenshire"), ("Croydon", "London"))
PRICES = (5.0, 45.0, 250.0, 1200.0)
#: A prediction counts as clear when its top class leads the second by this much; a listing on a
#: near-tie may tip either way under any edit at all, so it only has to keep its probabilities close.
CLEAR_MARGIN = 0.1
#: The most any class probability may move when only the town or the price written in the text changes.
MAX_SHIFT = 0.25

Predict = Callable[[Sequence[str]], np.ndarray]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 300-listing generated export through the real validate and clean steps."""
    work = tmp_path_factory.mktemp("behaviour")
    params = load_params()
    generate_sample(work / "raw", {**params["sample"], "n_products": 300, "image_size_min": 40, "image_size_max": 64})
    validate_raw(work / "raw", work / "validated", params["validation"], work / "docs")
    cleaning = {**params["cleaning"], "image_size": 32, "min_products_per_class": 3, "progress": False}
    clean_dataset(work / "validated", work / "raw" / "images", work / "clean", cleaning)
    return {"work": work, "validated": work / "validated", "clean": work / "clean"}


def _train_params(work: Path) -> dict:
    train = copy.deepcopy(load_params()["train"])
    train.update(device="cpu", mixed_precision=False, num_threads=1, num_workers=0,
                 models_dir=str(work / "models"), checkpoints_dir=str(work / "checkpoints"))
    train["text"].update(epochs=15, max_length=64, batch_size=32)
    return train


@pytest.fixture(scope="module", params=["text", "text-baseline"])
def model(request: pytest.FixtureRequest, sample: dict[str, Path]) -> tuple[str, Predict, list[str]]:
    """(kind, texts -> class probabilities, classes) of a model trained on the sample."""
    work, clean = sample["work"], sample["clean"]
    if request.param == "text":
        training.train_text_classifier(clean, _train_params(work), work / "models" / "text", progress=False)
        classifier = inference.load_classifier(work / "models" / "text", device="cpu")
        predict: Predict = lambda texts: classifier.predict_proba([None] * len(texts), list(texts))  # noqa: E731
    else:
        baselines.train_text_baseline(clean, load_params(), work / "models" / "text-baseline")
        classifier = baselines.load_sklearn_model(work / "models" / "text-baseline")
        predict = lambda texts: classifier.predict_proba(list(texts))  # noqa: E731
    classes = list(classifier.classes)
    assert PHONES in classes
    return request.param, predict, classes


def _test_listings(clean: Path) -> pd.DataFrame:
    products = pd.read_parquet(clean / "products.parquet")
    test = products[products["split"] == "test"].reset_index(drop=True)
    assert len(test) >= 30, "the sample's test split is too small to say anything"
    return test


def test_the_models_learned_something_to_test(model: tuple[str, Predict, list[str]], sample: dict[str, Path]) -> None:
    """The behaviour below is only worth checking on a model far above chance (13 classes)."""
    kind, predict, _ = model
    test = _test_listings(sample["clean"])
    accuracy = float((predict(test["text"].tolist()).argmax(axis=1) == test["label"].to_numpy()).mean())
    assert accuracy > 0.5, f"{kind}: test accuracy {accuracy:.2f}"


def test_category_is_invariant_to_the_listings_price_and_town_fields(
    model: tuple[str, Predict, list[str]], sample: dict[str, Path]
) -> None:
    """Raw listing -> clean text -> prediction: the same for any price and any location.

    Real exports repeat the location in the name ("Sofa | in Leeds, West Yorkshire | Gumtree");
    the clean step strips it so a model cannot learn towns. Were it kept, or were price or
    location ever added to the text, this test would see the predictions move.
    """
    kind, predict, _ = model
    params = {**load_params()["cleaning"], "min_products_per_class": 1}
    raw = pd.read_parquet(sample["validated"] / "products.parquet")
    test_ids = set(_test_listings(sample["clean"])["product_id"])
    raw = raw[raw["id"].isin(test_ids)].reset_index(drop=True)
    assert raw["product_name"].str.contains(r"\| in .* \| Gumtree$").mean() > 0.5  # the tail is there to strip

    baseline = clean_products(raw, params).products.set_index("product_id")
    reference = predict(baseline["text"].tolist())
    for town, county in TOWNS:
        for price in PRICES:
            moved = raw.copy()
            moved["price"] = format_price(price)
            moved["location"] = f"{town}, {county}"
            moved["product_name"] = moved["product_name"].str.replace(
                r"\| in .* \| Gumtree$", f"| in {town}, {county} | Gumtree", regex=True
            )
            assert (moved["product_name"] != raw["product_name"]).any()
            cleaned = clean_products(moved, params).products.set_index("product_id").loc[baseline.index]
            assert (cleaned["price"] == price).all() and (cleaned["town"] == town).all()
            probs = predict(cleaned["text"].tolist())
            changed = np.flatnonzero(probs.argmax(axis=1) != reference.argmax(axis=1))
            assert changed.size == 0, (
                f"{kind}: {changed.size} listing(s) change category when moved to {town} at £{price:g}, "
                f"e.g. {cleaned.index[changed[0]]!r}"
            )
            np.testing.assert_allclose(probs, reference, atol=1e-6, err_msg=f"{kind}: {town}, £{price:g}")

    # the control: with the tail kept, the town does reach the text, so the test above has teeth
    kept = clean_products(raw, {**params, "text": {"strip_gumtree_suffix": False}}).products
    assert kept["text"].str.contains(" Gumtree").all()


def test_category_is_invariant_to_price_and_town_written_in_the_description(
    model: tuple[str, Predict, list[str]], sample: dict[str, Path]
) -> None:
    """Sellers write where to collect and what they ask; neither says what the item is."""
    kind, predict, classes = model
    texts = _test_listings(sample["clean"])["text"].tolist()

    def written(town: str, price: float) -> list[str]:
        return [f"{text} Collection from {town}. Asking {format_price(price)} ono." for text in texts]

    reference = predict(written(TOWNS[0][0], PRICES[0]))
    top2 = np.sort(reference, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) >= CLEAR_MARGIN
    assert clear.mean() > 0.6, f"{kind}: too few clear predictions ({clear.mean():.0%}) to test invariance on"
    for town, _ in TOWNS:
        for price in PRICES:
            probs = predict(written(town, price))
            flipped = np.flatnonzero(clear & (probs.argmax(axis=1) != reference.argmax(axis=1)))
            assert flipped.size == 0, (
                f"{kind}: writing {town} / {format_price(price)} changes the category of {flipped.size} listing(s), "
                f"e.g. {texts[flipped[0]][:80]!r}: {classes[reference[flipped[0]].argmax()]} -> "
                f"{classes[probs[flipped[0]].argmax()]}"
            )
            shift = float(np.abs(probs - reference).max())
            assert shift <= MAX_SHIFT, f"{kind}: {town} / {format_price(price)} moves a class probability by {shift:.2f}"


def test_adding_iphone_12_unlocked_moves_a_listing_towards_phones(
    model: tuple[str, Predict, list[str]], sample: dict[str, Path]
) -> None:
    kind, predict, classes = model
    test = _test_listings(sample["clean"])
    phones = classes.index(PHONES)
    before = predict(test["text"].tolist())[:, phones]
    after = predict([f"{text} {PHONE_WORDS}" for text in test["text"]])[:, phones]
    gain = after - before
    not_moved = np.flatnonzero(gain <= 0)
    assert not_moved.size == 0, (
        f"{kind}: adding {PHONE_WORDS!r} does not raise P({PHONES}) for {not_moved.size} listing(s), "
        f"e.g. {test['text'][not_moved[0]][:80]!r} ({before[not_moved[0]]:.3f} -> {after[not_moved[0]]:.3f})"
    )
    assert gain.mean() >= 0.05, f"{kind}: P({PHONES}) rises by only {gain.mean():.3f} on average"
    # and the other way round: the same words in a phone listing keep it a phone
    is_phone = (test["label"] == phones).to_numpy()
    assert is_phone.any()
    assert (predict([f"{text} {PHONE_WORDS}" for text in test["text"][is_phone]]).argmax(axis=1) == phones).all()
