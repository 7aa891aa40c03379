"""The text model's recipe: a classifier of a product's `text` (one example per product) over a sentence encoder.

Why a module of its own: what only the text model does lives here, the sequence every model
shares in training_recipe.run_recipe. `train.text.fine_tune` true trains the encoder (its own
learning rate) with the head; false keeps the pretrained encoder frozen, encodes the texts
once (text_embedding_cache) and trains the head on the stored vectors. `train.text.wide`
adds a TF-IDF branch (wide_branch) fitted on the train split only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from pipeline_steps import datasets as ds
from pipeline_steps import models
from pipeline_steps.clean_schema import PRODUCTS_FILE
from pipeline_steps.text_embedding_cache import cached_text_embeddings, embedding_cache_dir
from pipeline_steps.train_params import checked_number, required_key
from pipeline_steps.training_loop import LoopSettings, fingerprint, loop_settings
from pipeline_steps.training_recipe import ParamGroup, Recipe, param_group
from pipeline_steps.wide_branch import wide_architecture, wide_enabled, wide_optimizer_settings, wide_param_groups, wide_settings


class TextRecipe(Recipe):
    """The text classifier: models.TextClassifier (+ wide branch), one example per product."""

    kind, examples, table = "text", "products", PRODUCTS_FILE

    def __init__(self, train_params: Mapping[str, Any], progress: bool = True) -> None:
        """Check every `train.text` knob (the encoder's name too) and the loop's, before any data is read (Args: `Recipe`)."""
        super().__init__(train_params, progress)
        params = self.params
        self.encoder_name = required_key(params, "encoder", "train.text.encoder")
        models.resolve_encoder_source(self.encoder_name)
        self.max_length = checked_number(params, "max_length", "text", minimum=8, integer=True)
        self.fine_tune = bool(params["fine_tune"])
        self.lr, self.weight_decay = checked_number(params, "lr", "text"), checked_number(params, "weight_decay", "text")
        self.encoder_lr = checked_number(params, "encoder_lr", "text") if self.fine_tune else 0.0
        use_wide = wide_enabled(params, "text")
        self.wide_config = wide_settings(params, "text") if use_wide else None
        self.wide_opt = wide_optimizer_settings(params, "text") if use_wide else None
        self.settings = loop_settings(params, "text", progress)

    def labels(self, data: ds.CleanData, split: str) -> list[int]:
        return data.products_of(split)["label"].tolist()

    def load(self, data: ds.CleanData) -> None:
        self.tokenizer, self.transformer = models.load_pretrained_encoder(self.encoder_name)

    def build(self, data: ds.CleanData) -> nn.Module:
        self.splits = {s: data.products_of(s) for s in ("train", "val")}
        # the wide branch's vocabulary and idf come from the train split only
        texts = self.splits["train"]["text"].tolist()
        self.featurizer = models.WideFeaturizer.fit(texts, self.wide_config) if self.wide_config is not None else None
        n_features = self.featurizer.n_features if self.featurizer else None
        self.model = models.build_text_classifier(self.transformer, self.params, len(data.classes), n_features)
        return self.model

    def data_identity(self, data: ds.CleanData) -> list[Any]:
        ids = {s: frame["product_id"].astype(str).tolist() for s, frame in self.splits.items()}
        return [fingerprint(ids), data.classes]

    def trainable(self) -> tuple[nn.Module, list[ParamGroup]]:
        model, wide_groups = self.model, wide_param_groups(self.model.wide, self.wide_opt)
        if self.fine_tune:
            groups = [
                param_group(model.encoder.parameters(), self.encoder_lr, self.weight_decay),
                param_group(model.head.parameters(), self.lr, self.weight_decay),
                *wide_groups,
            ]
            return model, groups
        model.encoder.requires_grad_(False)
        trained = models.WideAndDeepHead(model.head, model.wide) if model.wide is not None else model.head
        return trained, [param_group(model.head.parameters(), self.lr, self.weight_decay), *wide_groups]

    def datasets(self, data: ds.CleanData, settings: LoopSettings) -> tuple[Dataset, Dataset, Callable]:
        if self.fine_tune:
            train_set, val_set = (ds.text_dataset(data, s) for s in ("train", "val"))
            return train_set, val_set, ds.TextCollate(self.tokenizer, self.max_length, self.featurizer)
        identity = {"encoder": self.encoder_name, "weights": "pretrained"}
        vectors = {
            s: cached_text_embeddings(
                embedding_cache_dir(self.params), identity, self.model.encoder, self.tokenizer, frame["text"].tolist(),
                self.max_length, settings.device, self.progress,
            )
            for s, frame in self.splits.items()
        }
        # the test split's texts are encoded and stored too (their vectors only: no label is read, nothing
        # trains on them), as train_image stores every split's photos: the evaluate and index stages then
        # read every text's vector back (text_embedding_cache.stored_text_embeddings) instead of encoding
        test_texts = data.products_of("test")["text"].tolist()
        if test_texts:
            cached_text_embeddings(
                embedding_cache_dir(self.params), identity, self.model.encoder, self.tokenizer, test_texts,
                self.max_length, settings.device, self.progress,
            )
        sparse = {s: self.featurizer.transform(frame["text"].tolist()) if self.featurizer else None for s, frame in self.splits.items()}
        train_set, val_set = (
            ds.TensorDictDataset({"embedding": vectors[s]}, self.splits[s]["label"].tolist(), sparse=sparse[s]) for s in ("train", "val")
        )
        return train_set, val_set, ds.collate_tensor_dicts

    def saved_config(self, data: ds.CleanData) -> dict[str, Any]:
        return {
            "embedding_dim": self.model.embedding_dim,
            "architecture": {
                "type": "TextClassifier",
                "encoder": self.encoder_name,
                "encoder_dir": "encoder",
                "fine_tuned": self.fine_tune,
                "hidden_dim": int(self.params["hidden_dim"]),
                "dropout": float(self.params["dropout"]),
                "n_classes": len(data.classes),
                "embedding": "mean of the encoder's token vectors over the attention mask",
                "wide": wide_architecture(self.featurizer, self.wide_opt, "fitted on the train split"),
            },
            "preprocessing": {"text": {"column": "text", "max_length": self.max_length, "truncation": True}},
        }

    def saved_files(self) -> dict[str, Any]:
        return {"encoder_files": (self.tokenizer, self.model.encoder.transformer), "wide": self.featurizer}
