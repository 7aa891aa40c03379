"""Ranked search and "more like this" over HTTP, against the same tiny real bundle as tests/test_service.py,
and an old bundle (no ranking files) served dense-only."""

from __future__ import annotations

import json
import shutil

import pytest
import requests

from pipeline_steps.config import load_params

pytestmark = [pytest.mark.integration]

MAX_K = int(load_params()["serve"]["max_k"])
TIMEOUT = 60


@pytest.fixture(scope="module")
def url(bundle_dir, tmp_path_factory):
    from tests.support.serving import served

    with served(bundle_dir, tmp_path_factory.mktemp("service_ranking")) as proc:  # asserts no request got a 500
        yield proc.url


def _post(url: str, endpoint: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/{endpoint}", json=body, timeout=TIMEOUT)


def test_ranking_files_are_packaged_with_each_index(bundle_dir) -> None:
    for kind in ("image", "text", "multimodal"):
        ranking = json.loads((bundle_dir / "index" / kind / "ranking" / "ranking.json").read_text())
        index = json.loads((bundle_dir / "index" / kind / "index.json").read_text())
        assert (ranking["model_name"], ranking["model_version"]) == (index["model_name"], index["model_version"])
        assert ranking["config"]["chosen_on"] == "val"
        assert (bundle_dir / "index" / kind / "ranking" / "lexical").is_dir() == (kind != "image")


def test_metadata_names_the_ranking_of_each_index(url) -> None:
    meta = _post(url, "metadata", {}).json()
    assert set(meta["ranking"]) == {"image", "text", "multimodal"}
    assert meta["ranking"]["text"]["mode"] in ("hybrid", "dense+category", "dense")
    assert meta["ranking"]["image"]["fusion"] == "dense"


def test_search_reports_the_score_parts(url) -> None:
    body = _post(url, "search", {"text": "acoustic guitar", "k": 5}).json()
    assert body["ranking"]["mode"] in ("hybrid", "dense+category", "dense")
    results = body["results"]
    assert 1 <= len(results) <= 5
    for r in results:
        assert r["score"] == pytest.approx(r["retrieval_score"] + r["category_score"], abs=2e-6)
        assert r["dense_score"] is not None or r["lexical_score"] is not None
        assert r["category_score"] >= 0
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert len({r["product_id"] for r in results}) == len(results)


def test_category_stays_a_hard_filter(url) -> None:
    meta = _post(url, "metadata", {}).json()
    category = meta["categories"][0]
    body = _post(url, "search", {"text": "used item in good condition", "k": 10, "category": category}).json()
    assert body["results"] and {r["category"] for r in body["results"]} == {category}
    pid = body["results"][0]["product_id"]
    similar = _post(url, "similar", {"product_id": pid, "k": 10, "category": category}).json()
    assert {r["category"] for r in similar["results"]} <= {category}


def test_similar_returns_other_listings_ranked(url) -> None:
    first = _post(url, "search", {"text": "acoustic guitar", "k": 1}).json()["results"][0]
    response = _post(url, "similar", {"product_id": first["product_id"], "k": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["product_id"] == first["product_id"] and body["query"]["product_name"] == first["product_name"]
    ids = [r["product_id"] for r in body["results"]]
    assert len(ids) == 7 and first["product_id"] not in ids and len(set(ids)) == 7
    assert body["index"]["kind"] == "multimodal"
    # the text and multimodal indexes together, with the photo weight fitted on val (pipeline_steps/ranking_eval.py)
    assert body["ranking"]["mode"] == "similar: text + multimodal" and 0 <= body["ranking"]["photo_weight"] <= 1
    assert [r["score"] for r in body["results"]] == sorted((r["score"] for r in body["results"]), reverse=True)
    # multipart, as the page sends it
    form = requests.post(f"{url}/similar", files={"product_id": (None, json.dumps(first["product_id"])),
                                                 "k": (None, "3")}, timeout=TIMEOUT)
    assert form.status_code == 200 and len(form.json()["results"]) == 3


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"product_id": "no-such-listing", "k": 5}, 404, "no-such-listing"),
        ({"product_id": "../../etc/passwd"}, 400, "malformed product_id"),
        ({"product_id": "x" * 150}, 400, "malformed product_id"),
        ({}, 400, "product_id"),
        ({"product_id": "whatever", "k": 0}, 400, "k"),
        ({"product_id": "whatever", "k": MAX_K + 1}, 400, "k"),
    ],
)
def test_similar_bad_input_is_named(url, body, status, words) -> None:
    response = _post(url, "similar", body)
    assert response.status_code == status, response.text
    payload = response.json()
    payload = payload[0] if isinstance(payload, list) else payload
    assert words in json.dumps(payload)


def test_an_old_bundle_without_ranking_files_is_served_dense_only(bundle_dir, tmp_path) -> None:
    from service.engine import MarketplaceEngine

    old = tmp_path / "old_bundle"
    shutil.copytree(bundle_dir, old)
    for kind in ("image", "text", "multimodal"):
        shutil.rmtree(old / "index" / kind / "ranking")
    engine = MarketplaceEngine(old)
    for kind, info in engine.metadata()["ranking"].items():
        assert info["mode"] == "dense-only" and "re-run the index stage" in info["reason"], (kind, info)
    found = engine.search(text="acoustic guitar", k=3)
    assert found["ranking"]["mode"] == "dense-only"
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True)
    similar = engine.similar(found["results"][0]["product_id"], k=3)
    assert similar["ranking"]["mode"] == "dense-only" and len(similar["results"]) == 3


def _with_similar(bundle_dir, target, **changes):
    shutil.copytree(bundle_dir, target)
    path = target / "index" / "multimodal" / "ranking" / "ranking.json"
    info = json.loads(path.read_text())
    info["similar"].update(changes)
    path.write_text(json.dumps(info))
    return target


def test_similar_with_photo_weight_0_is_the_text_ranking_and_a_stale_fusion_is_not_used(bundle_dir, tmp_path) -> None:
    from service.engine import MarketplaceEngine

    text_config = json.loads((bundle_dir / "index" / "text" / "ranking" / "ranking.json").read_text())["config"]
    engine = MarketplaceEngine(_with_similar(bundle_dir, tmp_path / "w0", photo_weight=0.0, config=text_config))
    text = engine.rankings["text"]
    pid = str(text.pids[0])
    row = text.row_of[pid]
    expected = text.search(text.vector_of(row), text.ranker.probs[row], None, 5, None, exclude=pid, query_row=row)
    got = engine.similar(pid, k=5)
    assert got["ranking"]["mode"] == "similar: text + multimodal"
    assert [r["product_id"] for r in got["results"]] == [h["product_id"] for h in expected]
    assert [r["score"] for r in got["results"]] == [h["score"] for h in expected]

    stale = _with_similar(bundle_dir, tmp_path / "stale", text_model=["another-text-model", "999"])
    answer = MarketplaceEngine(stale).similar(pid, k=5)
    assert answer["ranking"]["mode"] != "similar: text + multimodal" and len(answer["results"]) == 5
    assert "re-run the index stage" in answer["ranking"]["similar_fusion"]
