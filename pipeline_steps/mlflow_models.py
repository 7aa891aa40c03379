"""A trained model directory as an MLflow pyfunc model (registry, serving, BentoML import).

The pyfunc keeps the model directory as its single artifact and loads it with
`inference.load_classifier`, so MLflow serves exactly what evaluation measured:

    model = mlflow.pyfunc.load_model("models:/marketplace-text-classifier@champion")
    model.predict(pd.DataFrame({"text": ["Oak table. Seats six"], "image": [None]}))
    model.unwrap_python_model().classifier   # the inference.Classifier

Input columns: `text` (str or None) and `image` (base64-encoded JPEG/PNG bytes or None);
output: `category` (the most probable class) and one probability column per class,
named by the class.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo
from PIL import Image

from pipeline_steps.inference import Classifier, load_classifier, read_config
from pipeline_steps.model_kinds import NEURAL_KINDS

#: distributions the pyfunc imports when loaded (through pipeline_steps); pinned to the
#: installed versions. Passing them explicitly also skips MLflow's slow requirement inference.
RUNTIME_PACKAGES = (
    "mlflow", "cloudpickle", "torch", "torchvision", "transformers", "tokenizers", "safetensors",
    "numpy", "pandas", "pillow", "pyyaml", "tqdm",
    "scikit-learn", "joblib", "scipy",  # the wide branch's TF-IDF vectoriser (tfidf.joblib)
    "efficientnet-lite-pytorch",  # the EfficientNet-Lite image tower's architecture (its weights are in model.pt)
)
PACKAGE_DIR = Path(__file__).resolve().parent


def decode_image(value: Any, row: int = 0) -> Image.Image | None:
    """base64 text (optionally a data: URI) or raw bytes -> PIL image; None/NaN/"" -> None."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, str):
            value = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        image = Image.open(io.BytesIO(bytes(value)))
        image.load()
        return image
    except (binascii.Error, ValueError, OSError) as error:
        raise ValueError(f"row {row}: column 'image' is not a base64-encoded JPEG/PNG ({error})") from error


def encode_image(image: Image.Image, format: str = "JPEG") -> str:
    """PIL image -> base64 text, the `image` column format."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _text_or_none(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return str(value)


def category_frame(proba: Any, classes: Sequence[str], index: pd.Index) -> pd.DataFrame:
    """The pyfunc answer of every classifier: `category` then one probability column per class."""
    proba = np.asarray(proba, dtype=np.float64)
    out = pd.DataFrame(proba, columns=list(classes), index=index)
    out.insert(0, "category", [classes[i] for i in proba.argmax(axis=1)])
    return out


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper; artifacts = {"model_dir": <trained model directory>}."""

    def __init__(self) -> None:
        self.classifier: Classifier | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.classifier = load_classifier(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.classifier is None:
            raise RuntimeError("ClassifierPyfunc.predict called before load_context")
        frame = pd.DataFrame(model_input)
        n = len(frame)
        texts = [_text_or_none(v) for v in frame["text"]] if "text" in frame else [None] * n
        images = [decode_image(v, row) for row, v in enumerate(frame["image"])] if "image" in frame else [None] * n
        kind = self.classifier.kind
        proba = self.classifier.predict_proba(
            images=None if kind == "text" else images, texts=None if kind == "image" else texts
        )
        return category_frame(proba, self.classifier.classes, frame.index)


def default_input_example(kind: str) -> pd.DataFrame:
    """A small input covering the rows the kind accepts (None marks optional columns)."""
    photo = encode_image(Image.new("RGB", (64, 64), (120, 90, 60)))
    text = "Oak dining table. Solid wood, seats six, collection only"
    if kind == "image":
        return pd.DataFrame({"text": [text, None], "image": [photo, photo]})
    if kind == "text":
        return pd.DataFrame({"text": [text, "Mountain bike. 21 gears"], "image": [photo, None]})
    return pd.DataFrame({"text": [text, None, "Mountain bike. 21 gears"], "image": [photo, photo, None]})


def pinned_requirements(packages: Sequence[str] = RUNTIME_PACKAGES) -> list[str]:
    """`name==installed version` for each installed package."""
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def log_classifier(
    model_dir: str | Path,
    name: str,
    input_example: pd.DataFrame | None = None,
    code_paths: Sequence[str | Path] | None = None,
    pip_requirements: Sequence[str] | None = None,
    **log_model_kwargs: Any,
) -> ModelInfo:
    """Log a trained model directory as a pyfunc model in the active (or a new) MLflow run.

    The signature is inferred from the input example and the model's own prediction on it;
    the `pipeline_steps` package travels as code_paths so the model loads without this
    repository installed. Extra keyword arguments (e.g. registered_model_name, metadata)
    go to `mlflow.pyfunc.log_model`.
    """
    model_dir = Path(model_dir)
    kind = read_config(model_dir)["kind"]
    example = input_example if input_example is not None else default_input_example(kind)
    wrapper = ClassifierPyfunc()
    wrapper.classifier = load_classifier(model_dir, device="cpu")
    signature = infer_signature(example, wrapper.predict(None, example))
    wrapper.classifier = None  # the logged object stays small; load_context rebuilds it
    metadata_ = {"kind": kind, **log_model_kwargs.pop("metadata", {})}
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=wrapper,
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        code_paths=[str(p) for p in (code_paths or [PACKAGE_DIR])],
        pip_requirements=list(pip_requirements) if pip_requirements is not None else pinned_requirements(),
        metadata=metadata_,
        **log_model_kwargs,
    )


# --------------------------------------------------------------------------- scikit-learn models

#: what the scikit-learn baselines and the price estimator import when loaded
SKLEARN_RUNTIME_PACKAGES = ("mlflow", "cloudpickle", "scikit-learn", "joblib", "scipy", "numpy", "pandas", "pillow")
PRICE_EXAMPLE = pd.DataFrame(
    {
        "text": ["Oak dining table. Solid wood, seats six", "Mountain bike. 21 gears"],
        "category": ["Home & Garden", "Sports, Leisure & Travel"],
        "town": ["Leeds", "Bristol"],
        "county": ["West Yorkshire", ""],
    }
)


class SklearnPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of a baseline or price-estimator directory (config.json + model.joblib).

    Classifiers answer like ClassifierPyfunc (`category` + one column per class);
    the price estimator takes `text, category, town, county` and answers `price` in £.
    """

    def __init__(self) -> None:
        self.model: Any = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipeline_steps.baselines import load_sklearn_model

        self.model = load_sklearn_model(context.artifacts["model_dir"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.model is None:
            raise RuntimeError("SklearnPyfunc.predict called before load_context")
        frame = pd.DataFrame(model_input)
        if self.model.kind == "price":
            return pd.DataFrame({"price": self.model.predict_price(frame)}, index=frame.index)
        if self.model.kind == "text_baseline":
            proba = self.model.predict_proba(texts=[_text_or_none(v) for v in frame["text"]])
        else:
            proba = self.model.predict_proba(images=[decode_image(v, row) for row, v in enumerate(frame["image"])])
        return category_frame(proba, self.model.classes, frame.index)


def log_sklearn_model_dir(model_dir: str | Path, name: str, **log_model_kwargs: Any) -> ModelInfo:
    """Log a scikit-learn model directory as a pyfunc model, with signature and input example."""
    from pipeline_steps.baselines import load_sklearn_model

    model_dir = Path(model_dir)
    wrapper = SklearnPyfunc()
    wrapper.model = load_sklearn_model(model_dir)
    kind = wrapper.model.kind
    if kind == "price":
        example = PRICE_EXAMPLE
    elif kind == "text_baseline":
        example = default_input_example("text")
    else:
        example = default_input_example("image")
    signature = infer_signature(example, wrapper.predict(None, example))
    wrapper.model = None
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=wrapper,
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=pinned_requirements(SKLEARN_RUNTIME_PACKAGES),
        metadata={"kind": kind, **log_model_kwargs.pop("metadata", {})},
        **log_model_kwargs,
    )



def log_model_dir(kind: str, model_dir: str | Path, name: str = "model", **log_model_kwargs: Any) -> ModelInfo:
    """Log any trained model directory (neural or scikit-learn) into the active MLflow run."""
    if kind in NEURAL_KINDS:
        return log_classifier(model_dir, name, **log_model_kwargs)
    return log_sklearn_model_dir(model_dir, name, **log_model_kwargs)


def find_model_dir(downloaded: str | Path) -> Path:
    """The trained model directory inside a downloaded MLflow model (its `model_dir` artifact)."""
    downloaded = Path(downloaded)
    candidates = sorted(
        config.parent
        for config in downloaded.rglob("config.json")
        if (config.parent / "model.pt").is_file() or (config.parent / "model.joblib").is_file()
    )
    if not candidates:
        raise FileNotFoundError(f"{downloaded} holds no trained model directory (config.json + weights)")
    return min(candidates, key=lambda path: len(path.parts))
