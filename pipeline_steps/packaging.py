"""Packaging: the serving bundle, its BentoML model, and the Bento.

Bundle layout (docs/ARCHITECTURE.md, "Bundle"), written atomically as a whole::

    bundle.json            model names+versions, index metadata, build time
    models/<kind>/         model directories of the champions
    index/<kind>/          the indexes of those champions
    listings.parquet       product_id, image_id, product_name, price, location, category
    thumbnails/<image id>.jpg

`assemble_bundle` refuses to package an index next to a model version it was
not built from, so the service never has to discover that mismatch at start-up
(it checks again anyway).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from pipeline_steps.errors import PipelineError
from pipeline_steps.io_utils import atomic_dir, link_or_copy, read_json, write_json
from pipeline_steps.index_meta import META_FILE, model_mismatch
from pipeline_steps.model_kinds import INDEX_KINDS, SERVED_KINDS as MODEL_KINDS
from pipeline_steps.runtime_env import OFFLINE_ENV

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
LISTING_COLUMNS = ("product_id", "image_id", "product_name", "price", "location", "category")
DEFAULT_THUMBNAIL_SIZE = 160
THUMBNAIL_QUALITY = 80
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")  # image ids that are safe as file names

class BundleError(PipelineError):
    """The inputs of a bundle are missing or inconsistent (e.g. index built from another model version)."""


# --------------------------------------------------------------------------- bundle


def assemble_bundle(
    out_dir: str | Path,
    model_dirs: Mapping[str, tuple[str | Path, str, str | int]],
    index_dirs: Mapping[str, str | Path],
    clean_dir: str | Path,
    *,
    thumbnail_size: int = DEFAULT_THUMBNAIL_SIZE,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the serving bundle to `out_dir` (replaced as a whole, atomically) and return its path.

    model_dirs: {kind: (model_dir, registered model name, registered version)} for kinds among
        image, text, multimodal, price.
    index_dirs: {kind: index dir} (index.faiss, ids.parquet, index.json) for kinds among image,
        text, multimodal; each index must name the same model name+version as model_dirs[kind].
    clean_dir: `data.clean_dir` (listings.parquet and images/<image id>.jpg are read from it).
    """
    out_dir = Path(out_dir)
    clean_dir = Path(clean_dir)
    if not model_dirs:
        raise BundleError("assemble_bundle needs at least one model directory")

    models_meta = _check_models(model_dirs)
    index_meta = _check_indexes(index_dirs, models_meta)
    listings = _read_listings(clean_dir)

    with atomic_dir(out_dir) as tmp:
        # linked, not copied, where the filesystem allows: these files are never edited in place
        for kind, (model_dir, _name, _version) in model_dirs.items():
            shutil.copytree(Path(model_dir), tmp / "models" / kind, copy_function=link_or_copy)
        for kind, index_dir in index_dirs.items():
            shutil.copytree(Path(index_dir), tmp / "index" / kind, copy_function=link_or_copy)

        listings.to_parquet(tmp / "listings.parquet", index=False)
        thumbs = _write_thumbnails(listings, clean_dir, tmp / "thumbnails", thumbnail_size)

        categories = _categories(clean_dir, listings)
        payload: dict[str, Any] = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "models": models_meta,
            "indexes": index_meta,
            "categories": categories,
            "listings": {
                "rows": int(len(listings)),
                "products": int(listings["product_id"].nunique()),
                "images": int(listings["image_id"].notna().sum()),
            },
            "thumbnails": {"count": thumbs["written"], "missing": thumbs["missing"], "size": thumbnail_size},
        }
        if extra_metadata:
            payload["extra"] = dict(extra_metadata)
        write_json(tmp / "bundle.json", payload)
    logger.info(
        "bundle written to %s: models %s, indexes %s, %d listings, %d thumbnails",
        out_dir,
        sorted(models_meta),
        sorted(index_meta),
        len(listings),
        thumbs["written"],
    )
    return out_dir


def read_bundle_info(bundle_dir: str | Path) -> dict[str, Any]:
    """bundle.json of a bundle directory, with an error naming the directory when it is not a bundle."""
    path = Path(bundle_dir) / "bundle.json"
    if not path.is_file():
        raise BundleError(f"{bundle_dir} is not a serving bundle (no bundle.json); build one with flows/package.py")
    return read_json(path)


def _check_models(model_dirs: Mapping[str, tuple[str | Path, str, str | int]]) -> dict[str, dict[str, Any]]:
    meta: dict[str, dict[str, Any]] = {}
    for kind, spec in model_dirs.items():
        if kind not in MODEL_KINDS:
            raise BundleError(f"unknown model kind {kind!r}; accepted kinds: {', '.join(MODEL_KINDS)}")
        try:
            model_dir, name, version = spec
        except (TypeError, ValueError) as exc:
            raise BundleError(f"model_dirs[{kind!r}] must be (model_dir, name, version), got {spec!r}") from exc
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise BundleError(f"model directory for {kind!r} not found: {model_dir}")
        if not any(model_dir.iterdir()):
            raise BundleError(f"model directory for {kind!r} is empty: {model_dir}")
        entry: dict[str, Any] = {"name": str(name), "version": str(version), "dir": f"models/{kind}"}
        run_id = model_dir / "run_id.txt"
        if run_id.is_file():
            entry["run_id"] = run_id.read_text(encoding="utf-8").strip()
        meta[kind] = entry
    return meta


def _check_indexes(
    index_dirs: Mapping[str, str | Path], models_meta: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    meta: dict[str, dict[str, Any]] = {}
    for kind, index_dir in index_dirs.items():
        if kind not in INDEX_KINDS:
            raise BundleError(f"unknown index kind {kind!r}; accepted kinds: {', '.join(INDEX_KINDS)}")
        index_dir = Path(index_dir)
        info_path = index_dir / META_FILE
        if not info_path.is_file():
            raise BundleError(f"index for {kind!r} has no index.json: {index_dir}")
        info = read_json(info_path)
        model = models_meta.get(kind)
        if model is None:
            raise BundleError(
                f"index {kind!r} ({index_dir}) was given without a {kind!r} model; "
                "an index is only served with the model it was built from"
            )
        index_model = model_mismatch(info, (model["name"], model["version"]))
        if index_model is not None:
            raise BundleError(
                f"index {kind!r} was built from model {index_model[0]} version {index_model[1]}, "
                f"but the bundle packages {model['name']} version {model['version']}; rebuild the index "
                "(flows/index.py) for this model version"
            )
        entry = {key: info[key] for key in ("kind", "factory", "dim", "size", "model_name", "model_version", "built_at") if key in info}
        entry["dir"] = f"index/{kind}"
        meta[kind] = entry
    return meta


def _read_listings(clean_dir: Path) -> pd.DataFrame:
    path = clean_dir / "listings.parquet"
    if not path.is_file():
        raise BundleError(f"{path} not found: run the clean stage first (data.clean_dir)")
    listings = pd.read_parquet(path)
    missing = [col for col in LISTING_COLUMNS if col not in listings.columns]
    if missing:
        raise BundleError(f"{path} lacks columns {missing}; expected {list(LISTING_COLUMNS)}")
    listings = listings.loc[:, list(LISTING_COLUMNS)].copy()
    listings["product_id"] = listings["product_id"].astype("string")
    listings["image_id"] = listings["image_id"].astype("string")
    listings["product_name"] = listings["product_name"].astype("string")
    listings["location"] = listings["location"].astype("string")
    listings["category"] = listings["category"].astype("string")
    listings["price"] = pd.to_numeric(listings["price"], errors="coerce").astype("float64")
    return listings.reset_index(drop=True)


def _categories(clean_dir: Path, listings: pd.DataFrame) -> list[str]:
    labels = clean_dir / "labels.json"
    if labels.is_file():
        classes = read_json(labels).get("classes")
        if classes:
            return [str(c) for c in classes]
    return sorted(str(c) for c in listings["category"].dropna().unique())


def _image_path(clean_dir: Path, image_id: str, paths: Mapping[str, str]) -> Path:
    rel = paths.get(image_id)
    return clean_dir / rel if rel else clean_dir / "images" / f"{image_id}.jpg"


def _write_thumbnails(listings: pd.DataFrame, clean_dir: Path, out: Path, size: int) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    images_parquet = clean_dir / "images.parquet"
    if images_parquet.is_file():
        frame = pd.read_parquet(images_parquet, columns=["image_id", "path"])
        paths = dict(zip(frame["image_id"].astype(str), frame["path"].astype(str)))
    written = missing = 0
    for image_id in listings["image_id"].dropna().unique():
        image_id = str(image_id)
        if not _SAFE_ID.fullmatch(image_id):
            logger.warning("skipping thumbnail for unsafe image id %r", image_id)
            missing += 1
            continue
        src = _image_path(clean_dir, image_id, paths)
        try:
            with Image.open(src) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size))
                image.save(out / f"{image_id}.jpg", format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
            written += 1
        except (OSError, ValueError) as exc:
            logger.warning("no thumbnail for image %s (%s): %s", image_id, src, exc)
            missing += 1
    return {"written": written, "missing": missing}


# --------------------------------------------------------------------------- BentoML


def bundle_labels(info: Mapping[str, Any]) -> dict[str, str]:
    """BentoML labels (strings only) naming every model version in a bundle.json."""
    labels = {"bundle_format": str(info.get("format_version", BUNDLE_FORMAT_VERSION))}
    for kind, model in sorted((info.get("models") or {}).items()):
        labels[f"{kind}_model"] = str(model.get("name"))
        labels[f"{kind}_model_version"] = str(model.get("version"))
    for kind, index in sorted((info.get("indexes") or {}).items()):
        if "size" in index:
            labels[f"{kind}_index_size"] = str(index["size"])
    if info.get("built_at"):
        labels["built_at"] = str(info["built_at"])
    return labels


def save_bundle_to_bentoml(
    bundle_dir: str | Path, name: str, metadata: Mapping[str, Any] | None = None
) -> str:
    """Copy a bundle directory into the BentoML model store as model `name`; return its tag ("name:version").

    Labels carry the model names/versions and index sizes (strings, filterable with
    `bentoml models list`); metadata holds bundle.json plus the caller's `metadata`.
    The store is the one of BENTOML_HOME (read by bentoml at import time).
    """
    import bentoml

    bundle_dir = Path(bundle_dir)
    info = read_bundle_info(bundle_dir)
    meta: dict[str, Any] = {"bundle": json.loads(json.dumps(info, default=str))}
    if metadata:
        meta.update(json.loads(json.dumps(dict(metadata), default=str)))
    with bentoml.models.create(name, labels=bundle_labels(info), metadata=meta) as model:
        shutil.copytree(bundle_dir, model.path, dirs_exist_ok=True, copy_function=link_or_copy)
    tag = str(model.tag)
    logger.info("saved bundle %s as BentoML model %s", bundle_dir, tag)
    return tag


def check_bentofile(bentofile: str | Path, bento_name: str, bundle_model: str) -> None:
    """Fail before building when bentofile.yaml and params.yaml `serve:` name different things.

    `bentoml build` reads only the bentofile: with another `serve.bundle_model` it would pack
    a stale bundle of the old name (or fail deep in BentoML), so say which keys disagree.
    """
    import yaml

    path = Path(bentofile)
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    problems = []
    if spec.get("name") != bento_name:
        problems.append(f"name is {spec.get('name')!r} but params.yaml serve.bento_name is {bento_name!r}")
    models = [m if isinstance(m, str) else (m or {}).get("tag", "") for m in spec.get("models") or []]
    if not any(str(m).split(":", 1)[0] == bundle_model for m in models):
        problems.append(f"models {models} do not include params.yaml serve.bundle_model {bundle_model!r}")
    if problems:
        raise BundleError(f"{path}: " + "; ".join(problems) + " (change one so they agree)")


def build_bento(
    project_root: str | Path,
    bentofile: str = "bentofile.yaml",
    *,
    version: str | None = None,
    timeout: float = 900,
) -> str:
    """Run `bentoml build` (offline) in `project_root` and return the Bento tag ("name:version").

    BENTOML_HOME and the rest of the environment are passed through; telemetry and hub
    access are switched off. The bentofile must set `python: {lock_packages: false}` here.
    """
    project_root = Path(project_root).resolve()
    bentofile_path = Path(bentofile)
    if not bentofile_path.is_absolute():
        bentofile_path = project_root / bentofile_path
    if not bentofile_path.is_file():
        raise BundleError(f"bentofile not found: {bentofile_path}")
    cmd = [sys.executable, "-m", "bentoml", "build", str(project_root), "-f", str(bentofile_path), "--output", "tag"]
    if version:
        cmd += ["--version", version]
    env = {**os.environ, **OFFLINE_ENV}  # child `bentoml`: offline, no telemetry
    env.setdefault("PYTHONPATH", str(project_root))
    try:
        proc = subprocess.run(
            cmd, cwd=project_root, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BundleError(f"`bentoml build` did not finish within {timeout:.0f}s") from exc
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise BundleError(f"`bentoml build` failed (exit {proc.returncode}):\n{output[-4000:]}")
    match = re.search(r"__tag__:([^\s]+)", output)
    if not match:
        raise BundleError(f"`bentoml build` succeeded but printed no tag:\n{output[-2000:]}")
    tag = match.group(1)
    logger.info("built Bento %s", tag)
    return tag
