"""The BentoML service over HTTP, against a tiny bundle of REAL models.

The module fixture trains tiny image/text/multimodal classifiers and a price estimator
for one epoch on a generated clean dataset (pipeline_steps.training / baselines), indexes
them (pipeline_steps.index), packages a bundle (pipeline_steps.packaging) and serves it
with `bentoml serve service.service:MarketplaceSearch` in a subprocess. The bundle is
cached per version of the code (.pytest_cache), so a re-run skips the training.
Set MARKETPLACE_TEST_BUNDLE=<bundle dir> to test another bundle.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipeline_steps.config import PROJECT_ROOT, load_params
from service.batching import MicroBatcher

SERVE = load_params()["serve"]
MAX_LOCATION_CHARS = int(load_params()["validation"]["text"]["max_chars"]["location"])
MAX_K = int(SERVE["max_k"])
TIMEOUT = 60


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundle_info(bundle_dir) -> dict:
    return json.loads((bundle_dir / "bundle.json").read_text())


@pytest.fixture(scope="module")
def server(bundle_dir, tmp_path_factory):
    from tests.support.serving import served

    with served(bundle_dir, tmp_path_factory.mktemp("service")) as proc:  # asserts no request got a 500
        yield proc


@pytest.fixture(scope="module")
def url(server) -> str:
    return server.url


@pytest.fixture(scope="module")
def photo(bundle_dir) -> bytes:
    """A JPEG of one of the bundle's listings (the thumbnail: a real photo of the data)."""
    thumbs = sorted((bundle_dir / "thumbnails").glob("*.jpg"))
    assert thumbs, "the bundle has no thumbnails"
    return thumbs[0].read_bytes()


@pytest.fixture(scope="module")
def categories(bundle_info) -> list[str]:
    return list(bundle_info["categories"])


def _post(url: str, endpoint: str, *, json_body=None, files=None, data=None) -> requests.Response:
    if files is None and data is None:
        return requests.post(f"{url}/{endpoint}", json=json_body if json_body is not None else {}, timeout=TIMEOUT)
    return requests.post(f"{url}/{endpoint}", files=files, data=data, timeout=TIMEOUT)


def _mp_text(value: str) -> str:
    """Multipart text fields are JSON-encoded (the service's OpenAPI `encoding`)."""
    return json.dumps(value)


def _error_text(response: requests.Response) -> str:
    body = response.json()
    if isinstance(body, list):  # BentoML's own 4xx bodies are a one-element list
        body = body[0]
    assert "error" in body, body
    return str(body["error"]) + json.dumps(body.get("detail", ""))


# --------------------------------------------------------------------------- unit: the batcher (no server)


def test_microbatcher_groups_concurrent_requests_and_keeps_order() -> None:
    calls: list[int] = []

    def double(items):
        calls.append(len(items))
        time.sleep(0.02)
        return [2 * x for x in items]

    async def main():
        batcher = MicroBatcher(double, max_batch_size=8, max_latency_ms=20)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(40)))
        return results, batcher.stats()

    results, stats = asyncio.run(main())
    assert results == [2 * i for i in range(40)]
    assert max(calls) > 1 and max(calls) <= 8
    assert stats["items"] == 40 and stats["batches"] == len(calls)


def test_microbatcher_delivers_errors_to_every_caller_of_the_batch_and_recovers() -> None:
    def flaky(items):
        if any(x < 0 for x in items):
            raise ValueError("negative")
        return items

    async def main():
        batcher = MicroBatcher(flaky, max_batch_size=4, max_latency_ms=0)
        bad = await asyncio.gather(batcher.submit(-1), return_exceptions=True)
        good = await batcher.submit(3)
        return bad, good

    bad, good = asyncio.run(main())
    assert isinstance(bad[0], ValueError)
    assert good == 3


def test_microbatcher_single_request_is_not_delayed() -> None:
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch_size=32, max_latency_ms=500)
        start = time.perf_counter()
        await batcher.submit(1)
        return time.perf_counter() - start

    assert asyncio.run(main()) < 0.25


# --------------------------------------------------------------------------- packaging / start-up refusal


@pytest.mark.integration
def test_bundle_layout(bundle_dir, bundle_info) -> None:
    import pandas as pd

    assert set(bundle_info["models"]) == {"image", "text", "multimodal", "price"}
    for kind, model in bundle_info["models"].items():
        assert model["name"] and model["version"]
        assert (bundle_dir / "models" / kind / "config.json").is_file()
    for kind in ("image", "text", "multimodal"):
        index = bundle_info["indexes"][kind]
        assert (index["model_name"], index["model_version"]) == (
            bundle_info["models"][kind]["name"], bundle_info["models"][kind]["version"])
        assert index["size"] > 0
        assert (bundle_dir / "index" / kind / "index.faiss").is_file()
    assert bundle_info["built_at"]
    listings = pd.read_parquet(bundle_dir / "listings.parquet")
    assert list(listings.columns) == ["product_id", "image_id", "product_name", "price", "location", "category"]
    thumbs = list((bundle_dir / "thumbnails").glob("*.jpg"))
    assert len(thumbs) == listings["image_id"].notna().sum() == bundle_info["thumbnails"]["count"]
    with Image.open(thumbs[0]) as image:
        assert image.format == "JPEG" and max(image.size) <= bundle_info["thumbnails"]["size"]


@pytest.mark.integration
def test_assemble_bundle_refuses_an_index_of_another_model_version(bundle_dir, tmp_path) -> None:
    from pipeline_steps.packaging import BundleError, assemble_bundle

    info = json.loads((bundle_dir / "bundle.json").read_text())
    model = info["models"]["text"]
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(bundle_dir / "listings.parquet", clean / "listings.parquet")
    with pytest.raises(BundleError, match="rebuild the index"):
        assemble_bundle(
            tmp_path / "bundle",
            {"text": (bundle_dir / "models" / "text", model["name"], "999")},
            {"text": bundle_dir / "index" / "text"},
            clean,
        )
    assert not (tmp_path / "bundle").exists()


@pytest.mark.integration
@pytest.mark.parametrize("links", [True, False], ids=["links", "no-links"])
def test_the_bundle_links_model_and_index_files_where_it_can(bundle_dir, tmp_path, monkeypatch, links) -> None:
    """Same bytes either way; shared inodes (no second copy, nothing for DVC to hash again) when links work."""
    import os

    from pipeline_steps.packaging import assemble_bundle

    if not links:
        def refuse(src, dst):  # noqa: ANN001, ANN202 - a filesystem without hard links
            raise OSError(1, "Operation not permitted")
        monkeypatch.setattr(os, "link", refuse)
    # the sources: a model and its index outside the bundle, as the index stage leaves them
    sources = tmp_path / "sources"
    shutil.copytree(bundle_dir / "models" / "text", sources / "model")
    shutil.copytree(bundle_dir / "index" / "text", sources / "index")
    model = json.loads((bundle_dir / "bundle.json").read_text())["models"]["text"]
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(bundle_dir / "listings.parquet", clean / "listings.parquet")

    out = assemble_bundle(tmp_path / "bundle", {"text": (sources / "model", model["name"], model["version"])},
                          {"text": sources / "index"}, clean)

    pairs = [(src, out / "models" / "text" / src.relative_to(sources / "model")) for src in (sources / "model").rglob("*") if src.is_file()]
    pairs += [(src, out / "index" / "text" / src.relative_to(sources / "index")) for src in (sources / "index").rglob("*") if src.is_file()]
    assert pairs
    for src, dst in pairs:
        assert dst.read_bytes() == src.read_bytes()
        assert os.path.samefile(src, dst) is links, dst


@pytest.fixture()
def mismatched_bundle(bundle_dir, tmp_path) -> Path:
    bad = tmp_path / "bad_bundle"
    shutil.copytree(bundle_dir, bad)
    index_json = bad / "index" / "text" / "index.json"
    meta = json.loads(index_json.read_text())
    meta["model_version"] = "999"
    index_json.write_text(json.dumps(meta))
    return bad


@pytest.mark.integration
def test_engine_refuses_an_index_built_from_another_model_version(mismatched_bundle) -> None:
    from service.engine import BundleLoadError, MarketplaceEngine, preflight_bundle

    with pytest.raises(BundleLoadError, match="refusing to serve the 'text' index.*version 999"):
        preflight_bundle(mismatched_bundle)
    with pytest.raises(BundleLoadError, match="Rebuild the index"):
        MarketplaceEngine(mismatched_bundle)


@pytest.mark.integration
def test_server_refuses_to_start_with_a_mismatched_index(mismatched_bundle, tmp_path) -> None:
    from tests.support.serving import ServiceProcess

    proc = ServiceProcess(mismatched_bundle, tmp_path / "home", tmp_path / "serve.log")
    with pytest.raises(RuntimeError) as info:
        proc.start(timeout=120)
    proc.stop()
    assert "refusing to serve the 'text' index" in str(info.value)


@pytest.mark.integration
def test_server_refuses_a_directory_that_is_not_a_bundle(tmp_path) -> None:
    from tests.support.serving import ServiceProcess

    proc = ServiceProcess(tmp_path, tmp_path / "home", tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="not a serving bundle"):
        proc.start(timeout=120)
    proc.stop()


# --------------------------------------------------------------------------- HTTP: infrastructure


@pytest.mark.integration
def test_health_and_metrics_endpoints(url) -> None:
    assert requests.get(f"{url}/livez", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=TIMEOUT).status_code == 200
    metrics = requests.get(f"{url}/metrics", timeout=TIMEOUT)
    assert metrics.status_code == 200 and "bentoml" in metrics.text


@pytest.mark.integration
def test_openapi_schema_lists_the_endpoints(url) -> None:
    spec = requests.get(f"{url}/docs.json", timeout=TIMEOUT).json()
    for path in ("/predict", "/embed", "/search", "/metadata", "/livez", "/readyz"):
        assert path in spec["paths"], path
    assert "/ui/thumbnails/{image_id}.jpg" in spec["paths"]


@pytest.mark.integration
def test_metadata(url, bundle_info) -> None:
    response = _post(url, "metadata")
    assert response.status_code == 200
    meta = response.json()
    assert meta["built_at"] == bundle_info["built_at"]
    for kind in ("image", "text", "multimodal", "price"):
        assert meta["models"][kind] == {
            "kind": kind, "name": bundle_info["models"][kind]["name"], "version": bundle_info["models"][kind]["version"]}
    for kind in ("image", "text", "multimodal"):
        assert meta["indexes"][kind]["size"] == bundle_info["indexes"][kind]["size"]
        assert meta["indexes"][kind]["model_version"] == bundle_info["models"][kind]["version"]
    assert meta["categories"] == bundle_info["categories"]
    assert meta["limits"]["max_k"] == MAX_K


# --------------------------------------------------------------------------- HTTP: predict / embed


def _check_prediction(body: dict, kind: str, categories: list[str], bundle_info: dict) -> None:
    assert body["category"] in categories
    assert set(body["probabilities"]) == set(categories)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-3
    assert body["category"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"] == {"kind": kind, **{k: bundle_info["models"][kind][k] for k in ("name", "version")}}


@pytest.mark.integration
def test_predict_text_uses_the_text_model_and_estimates_a_price(url, categories, bundle_info) -> None:
    response = _post(url, "predict", json_body={"text": "Acoustic guitar with case, barely played"})
    assert response.status_code == 200, response.text
    body = response.json()
    _check_prediction(body, "text", categories, bundle_info)
    assert isinstance(body["price_estimate"], float) and body["price_estimate"] >= 0
    assert body["price_model"]["name"] == bundle_info["models"]["price"]["name"]


@pytest.mark.integration
def test_predict_price_uses_the_given_town_and_county(url, bundle_dir) -> None:
    """Issue 10: /predict sent a blank town/county to the price model, so the served estimate was not
    the one the evaluate stage scored. Now: the price model's estimate for the text, the predicted
    category and the given location, on every input form."""
    from service.engine import MarketplaceEngine

    price_model = MarketplaceEngine(bundle_dir).price_model
    text = "Acoustic guitar with case, barely played"

    def expected(category: str, town: str, county: str) -> float:
        frame = {"text": [text], "category": [category], "town": [town], "county": [county]}
        return round(float(price_model.predict_price(frame)[0]), 2)

    served = {}
    for town, county in (("Leeds", "West Yorkshire"), ("Bristol", "Bristol")):
        body = _post(url, "predict", json_body={"text": text, "town": town, "county": county}).json()
        assert body["price_estimate"] == pytest.approx(expected(body["category"], town, county), abs=0.011), body
        served[town] = body["price_estimate"]
    assert served["Leeds"] != served["Bristol"], "the price model knows both towns: the estimates must differ"
    # no location given: none is used (as before)
    body = _post(url, "predict", json_body={"text": text}).json()
    assert body["price_estimate"] == pytest.approx(expected(body["category"], "", ""), abs=0.011)
    # multipart, as the search page posts: JSON-encoded and plain text fields
    for town in (_mp_text("Leeds"), "Leeds"):
        form = _post(url, "predict", data={"text": _mp_text(text), "town": town, "county": _mp_text("West Yorkshire")})
        assert form.status_code == 200, form.text
        assert form.json()["price_estimate"] == served["Leeds"]


@pytest.mark.integration
def test_openapi_schema_documents_the_price_location(url) -> None:
    spec = requests.get(f"{url}/docs.json", timeout=TIMEOUT).json()
    body = json.dumps(spec["paths"]["/predict"])
    assert "town" in body and "county" in body


@pytest.mark.integration
def test_predict_image_uses_the_image_model_without_price(url, photo, categories, bundle_info) -> None:
    response = _post(url, "predict", files={"image": ("photo.jpg", photo, "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    _check_prediction(body, "image", categories, bundle_info)
    assert "price_estimate" not in body


@pytest.mark.integration
def test_predict_image_and_text_uses_the_multimodal_model(url, photo, categories, bundle_info) -> None:
    response = _post(url, "predict", files={"image": ("photo.jpg", photo, "image/jpeg")},
                     data={"text": _mp_text("Fridge freezer, works fine")})
    assert response.status_code == 200, response.text
    body = response.json()
    _check_prediction(body, "multimodal", categories, bundle_info)
    assert body["price_estimate"] >= 0


@pytest.mark.integration
def test_predict_accepts_png_with_alpha_and_odd_content_type(url) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (90, 50), (10, 200, 30, 120)).save(buffer, format="PNG")
    response = _post(url, "predict", files={"image": ("x.bin", buffer.getvalue(), "application/octet-stream")})
    assert response.status_code == 200, response.text
    assert response.json()["model"]["kind"] == "image"


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["image", "text", "multimodal"])
def test_embed(url, photo, bundle_info, kind) -> None:
    if kind == "text":
        response = _post(url, "embed", json_body={"text": "oak dining table"})
    else:
        data = {"text": _mp_text("oak dining table")} if kind == "multimodal" else None
        response = _post(url, "embed", files={"image": ("photo.jpg", photo, "image/jpeg")}, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["kind"] == kind
    assert body["dim"] == len(body["embedding"]) == bundle_info["indexes"][kind]["dim"]
    assert all(np.isfinite(body["embedding"]))


@pytest.mark.integration
def test_embed_is_deterministic(url) -> None:
    first = _post(url, "embed", json_body={"text": "lawn mower"}).json()["embedding"]
    second = _post(url, "embed", json_body={"text": "lawn mower"}).json()["embedding"]
    assert np.allclose(first, second, atol=1e-5)


# --------------------------------------------------------------------------- HTTP: search


RESULT_KEYS = {"product_id", "image_id", "score", "product_name", "price", "location", "category", "thumbnail_url"}


def _check_results(body: dict, kind: str, k: int, bundle_info: dict) -> list[dict]:
    assert body["model"]["kind"] == kind
    assert body["index"]["kind"] == kind
    assert body["index"]["size"] == bundle_info["indexes"][kind]["size"]
    assert body["index"]["model_version"] == body["model"]["version"]
    results = body["results"]
    assert 0 < len(results) <= k
    for item in results:
        assert RESULT_KEYS <= set(item)
        assert -1.0001 <= item["score"] <= 1.0001
    scores = [item["score"] for item in results]
    assert scores == sorted(scores, reverse=True)
    return results


@pytest.mark.integration
def test_search_text(url, bundle_info) -> None:
    response = _post(url, "search", json_body={"text": "acoustic guitar", "k": 5})
    assert response.status_code == 200, response.text
    results = _check_results(response.json(), "text", 5, bundle_info)
    assert len(results) == 5
    assert len({r["product_id"] for r in results}) == 5


@pytest.mark.integration
def test_search_image_collapses_photos_to_unique_products(url, photo, bundle_dir, bundle_info) -> None:
    import pandas as pd

    k = MAX_K
    response = _post(url, "search", files={"image": ("photo.jpg", photo, "image/jpeg")}, data={"k": str(k)})
    assert response.status_code == 200, response.text
    results = _check_results(response.json(), "image", k, bundle_info)
    ids = [r["product_id"] for r in results]
    assert len(ids) == len(set(ids))
    assert all(r["image_id"] for r in results)
    # the image index holds one vector per photo; each product with a photo comes back once
    products_with_photo = pd.read_parquet(bundle_dir / "index" / "image" / "ids.parquet")["product_id"].nunique()
    assert len(results) == min(k, products_with_photo)


@pytest.mark.integration
def test_photo_search_uses_the_pretrained_embedding(url, bundle_dir, bundle_info) -> None:
    """The photo index and the request are embedded by the packaged EfficientNet-Lite tower with the
    same preprocessing: a listing's own photo (sent as an upload, as its bundle thumbnail) finds that listing
    among the nearest (the tiny data's photos of one class are near-duplicates, so not always first)."""
    import pandas as pd

    config = json.loads((bundle_dir / "models" / "image" / "config.json").read_text())
    architecture = config["architecture"]
    assert architecture["backbone"].startswith("efficientnet_lite") and architecture["initial_weights"]["type"] == "packaged"
    assert config["preprocessing"]["image"]["mean"] == pytest.approx([127 / 255] * 3)
    assert bundle_info["indexes"]["image"]["dim"] == config["embedding_dim"] == config["search_embedding"]["dim"]
    ids = pd.read_parquet(bundle_dir / "index" / "image" / "ids.parquet")
    thumbnail = sorted((bundle_dir / "thumbnails").glob("*.jpg"))[0]
    owner = str(ids.loc[ids["image_id"].astype(str) == thumbnail.stem, "product_id"].iloc[0])
    response = _post(url, "search", files={"image": ("photo.jpg", thumbnail.read_bytes(), "image/jpeg")}, data={"k": "10"})
    assert response.status_code == 200, response.text
    results = _check_results(response.json(), "image", 10, bundle_info)
    assert owner in [r["product_id"] for r in results] and max(r["dense_score"] or 0 for r in results) > 0.9


@pytest.mark.integration
def test_search_image_and_text_uses_the_multimodal_index(url, photo, bundle_info) -> None:
    response = _post(url, "search", files={"image": ("photo.jpg", photo, "image/jpeg")},
                     data={"text": _mp_text("drum kit"), "k": "3"})
    assert response.status_code == 200, response.text
    _check_results(response.json(), "multimodal", 3, bundle_info)


@pytest.mark.integration
def test_search_category_filter(url, categories, bundle_info) -> None:
    for category in categories:
        response = _post(url, "search", json_body={"text": "acoustic guitar", "k": 5, "category": category.lower()})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["category"] == category
        results = _check_results(body, "text", 5, bundle_info)
        assert {r["category"] for r in results} == {category}


@pytest.mark.integration
def test_search_results_have_working_thumbnails(url, bundle_info) -> None:
    results = _post(url, "search", json_body={"text": "sofa bed", "k": 10}).json()["results"]
    with_photo = [r for r in results if r["thumbnail_url"]]
    assert with_photo
    for item in with_photo[:3]:
        assert item["thumbnail_url"] == f"/ui/thumbnails/{item['image_id']}.jpg"
        response = requests.get(url + item["thumbnail_url"], timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
        Image.open(io.BytesIO(response.content)).verify()


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/ui/thumbnails/no-such-image.jpg", "/ui/thumbnails/..%2Fbundle.json.jpg",
                                  "/ui/thumbnails/%2E%2E%2F%2E%2E%2Fbundle.jpg"])
def test_unknown_thumbnails_are_404(url, path) -> None:
    assert requests.get(url + path, timeout=TIMEOUT).status_code == 404


@pytest.mark.integration
def test_search_page_is_served(url) -> None:
    page = requests.get(f"{url}/ui/", timeout=TIMEOUT)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="search-form"' in page.text
    for asset in ("static/app.js", "static/style.css"):
        assert requests.get(f"{url}/ui/{asset}", timeout=TIMEOUT).status_code == 200


@pytest.mark.integration
def test_in_process_engine_matches_http(url, bundle_dir) -> None:
    from service.engine import MarketplaceEngine

    engine = MarketplaceEngine(bundle_dir)
    local = engine.search(text="washing machine", k=5)
    remote = _post(url, "search", json_body={"text": "washing machine", "k": 5}).json()
    assert [r["product_id"] for r in local["results"]] == [r["product_id"] for r in remote["results"]]
    assert np.allclose([r["score"] for r in local["results"]], [r["score"] for r in remote["results"]], atol=1e-4)


@pytest.mark.integration
def test_concurrent_requests_are_batched(url) -> None:
    texts = [f"used tumble dryer number {i}" for i in range(48)]
    stats = {}
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=24) as pool:
            responses = list(pool.map(lambda t: _post(url, "predict", json_body={"text": t}), texts))
        assert all(r.status_code == 200 for r in responses)
        stats = _post(url, "metadata").json()["batching"]["predict-text"]
        if stats["max_batch_size_seen"] > 1:
            break
    assert stats["max_batch_size_seen"] > 1, stats
    assert stats["max_batch_size_seen"] <= int(SERVE["batch_max_size"])


# --------------------------------------------------------------------------- HTTP: bad requests -> 4xx


def _png(size, mode="L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _bad_requests(photo: bytes) -> list[tuple[str, str, dict, int, str]]:
    """(id, endpoint, request kwargs, expected status, words the message must contain)."""
    max_bytes = int(SERVE["max_image_bytes"])
    max_pixels = int(SERVE["max_image_pixels"])
    side = int((max_pixels ** 0.5)) + 100
    return [
        ("predict-neither", "predict", {"json_body": {}}, 400, "neither"),
        ("predict-blank-text", "predict", {"json_body": {"text": "   "}}, 400, "neither"),
        ("embed-neither", "embed", {"json_body": {}}, 400, "neither"),
        ("search-neither", "search", {"json_body": {"k": 3}}, 400, "neither"),
        ("predict-non-image", "predict", {"files": {"image": ("notes.txt", b"just some text\n" * 10, "text/plain")}},
         415, "accepted formats"),
        ("search-pdf", "search", {"files": {"image": ("doc.pdf", b"%PDF-1.4\n1 0 obj\n", "application/pdf")}},
         415, "accepted formats"),
        ("predict-corrupt-jpeg", "predict", {"files": {"image": ("broken.jpg", photo[: len(photo) // 2], "image/jpeg")}},
         400, "corrupt"),
        ("predict-empty-file", "predict", {"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400, "empty"),
        ("predict-too-many-bytes", "predict",
         {"files": {"image": ("huge.jpg", b"\xff\xd8\xff" + os.urandom(max_bytes), "image/jpeg")}}, 413, "at most"),
        ("predict-too-many-pixels", "predict", {"files": {"image": ("bomb.png", _png((side, side)), "image/png")}},
         413, "pixels"),
        ("predict-10mb-text-json", "predict", {"json_body": {"text": "a" * 10_000_000}}, 413, "characters"),
        ("search-10mb-text-multipart", "search", {"data": {"text": "a" * 10_000_000}}, 413, "characters"),
        ("search-k-zero", "search", {"json_body": {"text": "table", "k": 0}}, 400, f"between 1 and {MAX_K}"),
        ("search-k-negative", "search", {"json_body": {"text": "table", "k": -5}}, 400, f"between 1 and {MAX_K}"),
        ("search-k-too-big", "search", {"json_body": {"text": "table", "k": MAX_K + 1}}, 400, f"between 1 and {MAX_K}"),
        ("search-k-not-int", "search", {"json_body": {"text": "table", "k": "ten"}}, 400, "integer"),
        ("search-unknown-category", "search", {"json_body": {"text": "table", "category": "Spaceships"}}, 400,
         "accepted categories"),
        ("predict-text-not-string", "predict", {"json_body": {"text": 42}}, 400, "string"),
        ("predict-image-as-text-field", "predict", {"data": {"image": "http://127.0.0.1:1/x.jpg"}}, 400, "file"),
        ("predict-image-in-json", "predict", {"json_body": {"image": "aGVsbG8="}}, 400, "image"),
        ("predict-town-not-string", "predict", {"json_body": {"text": "table", "town": 42}}, 400, "town"),
        ("predict-county-too-long", "predict", {"json_body": {"text": "table", "county": "x" * (MAX_LOCATION_CHARS + 1)}}, 400, "county"),
    ]


@pytest.mark.integration
def test_bad_requests_get_4xx_with_a_message(url, photo, categories) -> None:
    failures = []
    for case_id, endpoint, kwargs, status, words in _bad_requests(photo):
        response = _post(url, endpoint, **kwargs)
        if response.status_code != status:
            failures.append(f"{case_id}: {response.status_code} (expected {status}): {response.text[:300]}")
            continue
        message = _error_text(response)
        if words.lower() not in message.lower():
            failures.append(f"{case_id}: message {message[:300]!r} lacks {words!r}")
        if case_id == "search-unknown-category":
            assert all(c in message for c in categories), message
    assert not failures, "\n".join(failures)
    assert requests.get(f"{url}/readyz", timeout=TIMEOUT).status_code == 200


@pytest.mark.integration
def test_real_sized_text_is_served_and_longer_text_is_cut_with_a_note(url) -> None:
    """Issue 12: real listings of name + description > 5,000 characters were answered 413."""
    real = "Solid oak dining table. " + "Lovely condition, collection only, six chairs included. " * 175  # ~9,800
    for endpoint in ("predict", "search"):
        response = _post(url, endpoint, json_body={"text": real})
        assert response.status_code == 200, response.text[:300]
        assert "text_truncated" not in response.json()
    longer = "oak table " * 3_000  # 30,000 characters: accepted, cut to serve.model_text_chars
    for endpoint in ("predict", "embed", "search"):
        response = _post(url, endpoint, json_body={"text": longer})
        assert response.status_code == 200, response.text[:300]
        note = response.json()["text_truncated"]
        assert note["original_chars"] == 29_999 and note["used_chars"] <= 20_000
    assert _post(url, "predict", json_body={"text": "x" * 100_001}).status_code == 413


@pytest.mark.integration
def test_malformed_bodies_get_4xx(url) -> None:
    cases = [
        ({"data": b'{"text": ', "headers": {"content-type": "application/json"}}, 400),
        ({"data": b"garbage--xyz", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400),
        ({"data": b"garbage", "headers": {"content-type": "multipart/form-data"}}, 400),
        ({"data": b"\xff\xfe\x00", "headers": {"content-type": "application/json"}}, 400),
        ({"data": b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "headers": {"content-type": "application/json"}},
         400),
        ({"files": {"text": (None, "9" * 5001)}}, 400),  # BentoML json.loads()s multipart text fields
        ({"files": {"text": (None, "[" * 100_000)}}, 400),
    ]
    for kwargs, status in cases:
        response = requests.post(f"{url}/search", timeout=TIMEOUT, **kwargs)
        assert response.status_code == status, (kwargs, response.status_code, response.text[:300])


@pytest.mark.integration
def test_packaging_into_the_model_store_and_a_bento_that_serves(bundle_dir, tmp_path) -> None:
    """save_bundle_to_bentoml + build_bento, then `bentoml serve <bento>` without MARKETPLACE_BUNDLE_DIR."""
    from tests.support.serving import free_port

    home = tmp_path / "bentoml_home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("MARKETPLACE_BUNDLE_DIR", None)
    script = (
        "import json, sys\n"
        "from pipeline_steps.packaging import save_bundle_to_bentoml, build_bento\n"
        f"model = save_bundle_to_bentoml({str(bundle_dir)!r}, {SERVE['bundle_model']!r}, {{'note': 'test'}})\n"
        f"bento = build_bento({str(PROJECT_ROOT)!r})\n"
        "import bentoml\n"
        "info = bentoml.models.get(model).info\n"
        "print(json.dumps({'model': model, 'bento': bento, 'labels': info.labels, 'metadata': info.metadata}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model"].startswith(f"{SERVE['bundle_model']}:")
    assert result["bento"].startswith(f"{SERVE['bento_name']}:")
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert result["labels"]["text_model_version"] == info["models"]["text"]["version"]
    assert result["metadata"]["bundle"]["models"]["image"]["name"] == info["models"]["image"]["name"]
    assert result["metadata"]["note"] == "test"

    port = free_port()
    log = (tmp_path / "bento.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", result["bento"], "--port", str(port),
                             "--host", "127.0.0.1"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                ready = False
            if ready:
                break
            time.sleep(0.5)
        assert ready, (tmp_path / "bento.log").read_text()[-4000:]
        meta = requests.post(f"http://127.0.0.1:{port}/metadata", json={}, timeout=TIMEOUT).json()
        assert meta["source"] == f"BentoML model {result['model']}"
        found = requests.post(f"http://127.0.0.1:{port}/search", json={"text": "guitar", "k": 2}, timeout=TIMEOUT)
        assert found.status_code == 200 and len(found.json()["results"]) == 2
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()



def test_bentofile_agrees_with_params_and_a_mismatch_is_named(tmp_path) -> None:
    from pipeline_steps.packaging import BundleError, check_bentofile

    check_bentofile(PROJECT_ROOT / "bentofile.yaml", SERVE["bento_name"], SERVE["bundle_model"])  # the shipped pair agrees
    with pytest.raises(BundleError, match="serve.bundle_model 'other-bundle'"):
        check_bentofile(PROJECT_ROOT / "bentofile.yaml", SERVE["bento_name"], "other-bundle")
    renamed = tmp_path / "bentofile.yaml"
    renamed.write_text((PROJECT_ROOT / "bentofile.yaml").read_text().replace(f"name: {SERVE['bento_name']}", "name: elsewhere", 1))
    with pytest.raises(BundleError, match="serve.bento_name"):
        check_bentofile(renamed, SERVE["bento_name"], SERVE["bundle_model"])


def test_bentofile_packs_only_project_code_even_with_the_store_inside_the_project(tmp_path) -> None:
    """make demo keeps BENTOML_HOME in ./bentoml_home: an unanchored "params.yaml" pattern once
    matched the copies inside earlier Bentos and `bentoml build` recursed into its own tmp dir."""
    import yaml
    from bentoml._internal.bento.build_config import BentoPathSpec

    spec = yaml.safe_load((PROJECT_ROOT / "bentofile.yaml").read_text())
    paths = BentoPathSpec(spec["include"], spec["exclude"], ctx_dir=str(tmp_path))
    for packed in ("params.yaml", "service/service.py", "service/static/index.html", "pipeline_steps/models.py"):
        assert paths.includes(packed), packed
    for left_out in (
        "bentoml_home/bentos/marketplace-search/abc/src/params.yaml",
        "bentoml_home/tmp/bentoml_bento_x/src/service/service.py",
        "service/devtools.py",
        "tests/support/tiny_bundle.py",
        "artifacts/bundle/info.json",
        "mlruns/mlflow.db",
    ):
        assert not paths.includes(left_out), left_out
