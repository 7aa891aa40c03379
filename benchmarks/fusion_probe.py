"""How much could a late fusion of the trained text and image models gain over text alone?

Why it exists: the learned-fusion multimodal model scores about the same as the text model on the
real listings (84.2% vs 84.1% test), and `photo_calibration` (a per-class photo weight fitted on val)
found a weight of ~0.03. Before building anything, this probe measures what a plain late fusion
of the two *already trained* models gives, with every setting chosen on the val split and the test
split scored once per method:

* text alone, image alone (photos pooled per product), the multimodal model;
* product of experts: log p_text / T + w * L_image, T fitted on val NLL (temperature scaling of the
  text model), w on a grid 0..3 chosen on val (by NLL, and by accuracy); L_image is the mean of the
  photos' log-probabilities (`mean_log`) or the log of their mean probability (`mean`). A test-oracle w
  is printed as an upper bound only;
* a logistic-regression stacker on [text log-probs, image log-probs], C chosen by 5-fold CV inside val.

A product without a photo keeps the text prediction. Scoring reuses the pipeline's own code
(`inference.load_classifier`/`predict_split` with the frozen-feature cache, `image_features.pool_by_product`,
`evaluation.classification_metrics`); predictions are cached in --work-dir so re-runs only redo the fusion.

    nice -n 19 .venv/bin/python benchmarks/fusion_probe.py --clean-dir /tmp/real9b/clean \\
        --models-dir /tmp/real9final/models --features-dir /tmp/real9b/features --work-dir /tmp/fusion_probe
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from scipy.special import log_softmax  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

from pipeline_steps import evaluation, inference  # noqa: E402
from pipeline_steps.image_features import pool_by_product  # noqa: E402

SPLITS = ("val", "test")
EPS = 1e-30
W_GRID = np.round(np.arange(0.0, 3.0001, 0.05), 2)
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def predictions(clean: Path, models: Path, features: Path, cache: Path) -> dict[str, np.ndarray]:
    """Per split: product ids and labels, text / multimodal log-probs per product, image log-probs
    pooled per product both ways (zeros = uniform for a product without a photo), has_photo."""
    if cache.is_file():
        return dict(np.load(cache, allow_pickle=True))
    out: dict[str, np.ndarray] = {}
    text = inference.load_classifier(models / "text", device="cpu")
    image = inference.load_classifier(models / "image", device="cpu")
    multi = inference.load_classifier(models / "multimodal", device="cpu")
    out["classes"] = np.array(text.classes)
    for split in SPLITS:
        print(f"scoring {split} ...", flush=True)
        t = inference.predict_split(text, clean, split, progress=False)
        m = inference.predict_split(multi, clean, split, progress=False, feature_cache_dir=features)
        assert (m.ids["product_id"] == t.ids["product_id"]).all()
        i = inference.predict_split(image, clean, split, progress=False, feature_cache_dir=features)
        ids = t.ids["product_id"].astype(str).tolist()
        row = {p: k for k, p in enumerate(ids)}
        for pooling in ("mean_log", "mean"):
            pids, _, pooled = pool_by_product(i.proba, i.ids["product_id"].astype(str).tolist(), i.labels, pooling)
            logp = np.zeros((len(ids), len(text.classes)))
            logp[[row[p] for p in pids]] = np.log(np.clip(pooled, EPS, 1.0))
            out[f"{split}_image_{pooling}"] = logp
        out[f"{split}_has_photo"] = np.isin(ids, i.ids["product_id"].astype(str).unique())
        out[f"{split}_ids"] = np.array(ids)
        out[f"{split}_y"] = t.labels.astype(int)
        out[f"{split}_text"] = np.log(np.clip(t.proba, EPS, 1.0))
        out[f"{split}_multimodal"] = np.log(np.clip(m.proba, EPS, 1.0))
        out[f"{split}_image_photo_acc"] = np.array(float((i.proba.argmax(1) == i.labels).mean()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def nll(scores: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(scores, axis=1)[np.arange(len(y)), y].mean())


def scores_row(scores: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, float]:
    metrics = evaluation.classification_metrics(y, np.exp(log_softmax(scores, axis=1)), classes)
    return {"accuracy": round(float(metrics["accuracy"]), 4), "macro_f1": round(float(metrics["macro_f1"]), 4), "n": int(len(y))}


def poe(text: np.ndarray, image: np.ndarray, t: float, w: float) -> np.ndarray:
    """Product of experts; a product without a photo has image == 0 and keeps the text prediction."""
    return text / t + w * image


def fit_temperature(text: np.ndarray, y: np.ndarray) -> float:
    """Temperature scaling: the T in [0.1, 10] minimising val NLL of softmax(log p / T)."""
    return float(np.exp(minimize_scalar(lambda lt: nll(text / np.exp(lt), y), bounds=(np.log(0.1), np.log(10.0)), method="bounded").x))


def choose_w(text: np.ndarray, image: np.ndarray, y: np.ndarray, t: float, by: str) -> float:
    if by == "nll":
        return float(min(W_GRID, key=lambda w: nll(poe(text, image, t, w), y)))
    acc = [float((poe(text, image, t, w).argmax(1) == y).mean()) for w in W_GRID]
    best = max(acc)  # ties: the smallest w reaching the best accuracy
    return float(W_GRID[acc.index(best)])


def stack_features(d: dict[str, np.ndarray], split: str) -> np.ndarray:
    """[text log-probs, image mean_log log-probs], each floored at log(1e-6) (the float32 softmax tails
    reach log(1e-30) and would dominate a linear model)."""
    return np.maximum(np.hstack([d[f"{split}_text"], d[f"{split}_image_mean_log"]]), np.log(1e-6))


def stacker(c: float) -> LogisticRegression:
    """Multinomial LR on the raw (floored) log-probs: they share one scale, and standardising them
    did worse in the val CV (log-loss 0.653 vs 0.625)."""
    return LogisticRegression(C=c, max_iter=5000)


def fit_stacker(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int = 0) -> tuple[object, float, dict[str, tuple[float, float]]]:
    """Multinomial LR; C chosen by 5-fold stratified CV inside val (held-out
    log-loss). Returns the model refitted on all of val, C, and {C: (CV log-loss, CV accuracy)}."""
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    cv: dict[str, tuple[float, float]] = {}
    for c in C_GRID:
        loss, correct = 0.0, 0
        for fit, held in folds.split(x, y):
            model = stacker(c).fit(x[fit], y[fit])
            proba = np.full((len(held), n_classes), 1e-15)
            proba[:, model.classes_] = model.predict_proba(x[held])
            loss -= float(np.log(np.clip(proba[np.arange(len(held)), y[held]], 1e-15, 1)).sum())
            correct += int((proba.argmax(1) == y[held]).sum())
        cv[str(c)] = (loss / len(y), correct / len(y))
    best = float(min(cv, key=lambda k: cv[k][0]))
    return stacker(best).fit(x, y), best, cv


def paired_bootstrap(a: np.ndarray, b: np.ndarray, y: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of accuracy(a) - accuracy(b) over test products resampled with replacement."""
    diff = (a.argmax(1) == y).astype(float) - (b.argmax(1) == y).astype(float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(y), (n, len(y)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-dir", type=Path, default=Path("/tmp/real9b/clean"))
    parser.add_argument("--models-dir", type=Path, default=Path("/tmp/real9final/models"))
    parser.add_argument("--features-dir", type=Path, default=Path("/tmp/real9b/features"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fusion_probe"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = predictions(args.clean_dir, args.models_dir, args.features_dir, args.work_dir / "predictions.npz")
    classes = [str(c) for c in d["classes"]]
    yv, yt = d["val_y"], d["test_y"]
    rows: list[tuple[str, str, dict, dict]] = []  # (method, settings, val, test)

    def add(name: str, setting: str, val_scores: np.ndarray, test_scores: np.ndarray) -> None:
        rows.append((name, setting, scores_row(val_scores, yv, classes), scores_row(test_scores, yt, classes)))

    add("text alone", "", d["val_text"], d["test_text"])
    add("multimodal (learned fusion)", "", d["val_multimodal"], d["test_multimodal"])
    hv, ht = d["val_has_photo"], d["test_has_photo"]
    image_only = (scores_row(d["val_image_mean_log"][hv], yv[hv], classes), scores_row(d["test_image_mean_log"][ht], yt[ht], classes))
    rows.append(("image alone, products with a photo (mean_log)", "", *image_only))

    t = fit_temperature(d["val_text"], yv)
    chosen: dict[str, np.ndarray] = {}
    for pooling in ("mean_log", "mean"):
        iv, it = d[f"val_image_{pooling}"], d[f"test_image_{pooling}"]
        for by in ("nll", "accuracy"):
            w = choose_w(d["val_text"], iv, yv, t, by)
            add(f"PoE, image {pooling}, w by val {by}", f"T={t:.3g}, w={w:g}", poe(d["val_text"], iv, t, w), poe(d["test_text"], it, t, w))
            chosen[f"{pooling}/{by}"] = poe(d["test_text"], it, t, w)
        oracle = max(W_GRID, key=lambda w: float((poe(d["test_text"], it, t, w).argmax(1) == yt).mean()))
        add(f"ORACLE (w picked on test, upper bound) PoE {pooling}", f"w={oracle:g}", poe(d["val_text"], iv, t, oracle), poe(d["test_text"], it, t, oracle))

    # diagnostic for photo_calibration: the same PoE on the multimodal model's (already fused) logits
    tm = fit_temperature(d["val_multimodal"], yv)
    wm = choose_w(d["val_multimodal"], d["val_image_mean_log"], yv, tm, "nll")
    add("PoE on multimodal logits, image mean_log, w by val nll", f"T={tm:.3g}, w={wm:g}",
        poe(d["val_multimodal"], d["val_image_mean_log"], tm, wm), poe(d["test_multimodal"], d["test_image_mean_log"], tm, wm))

    model, c, cv = fit_stacker(stack_features(d, "val")[hv], yv[hv], len(classes))
    stacked = {}
    for split, y, has in (("val", yv, hv), ("test", yt, ht)):
        out = d[f"{split}_text"].copy()  # no photo: text prediction
        proba = np.full((int(has.sum()), len(classes)), EPS)
        proba[:, model.classes_] = model.predict_proba(stack_features(d, split)[has])
        out[has] = np.log(proba)
        stacked[split] = out
    rows.append(("LR stacker [text, image mean_log log-probs] (val row in-sample)", f"C={c:g} (5-fold CV in val: acc {cv[str(c)][1]:.1%} on photo products)",
                 scores_row(stacked["val"], yv, classes), scores_row(stacked["test"], yt, classes)))

    print(f"\nproducts: val {len(yv)} ({int(hv.sum())} with a photo), test {len(yt)} ({int(ht.sum())} with a photo); "
          f"image per-photo accuracy val {float(d['val_image_photo_acc']):.1%}, test {float(d['test_image_photo_acc']):.1%}")
    print(f"text temperature fitted on val NLL: T={t:.3g} (val NLL {nll(d['val_text'], yv):.3f} -> {nll(d['val_text'] / t, yv):.3f}); "
          f"multimodal: T={tm:.3g} (val NLL {nll(d['val_multimodal'], yv):.3f} -> {nll(d['val_multimodal'] / tm, yv):.3f})")
    print("stacker 5-fold CV in val (log-loss, accuracy) by C:", {k: (round(v[0], 4), round(v[1], 4)) for k, v in cv.items()})
    for split, y, has in (("val", yv, hv), ("test", yt, ht)):  # how much room a late fusion has at all
        text_ok, image_ok = d[f"{split}_text"].argmax(1) == y, (d[f"{split}_image_mean_log"].argmax(1) == y) & has
        print(f"{split}: text wrong on {int((~text_ok).sum())} products; the image right on {int((~text_ok & image_ok).sum())} of them "
              f"(text-or-image ceiling {float((text_ok | image_ok).mean()):.1%}); image right in {float(image_ok[~text_ok].mean()):.0%} of text errors")
    print("\n| method | settings (chosen on val) | val acc | val macro-F1 | test acc | test macro-F1 |\n|---|---|---:|---:|---:|---:|")
    for name, setting, v, te in rows:
        print(f"| {name} | {setting} | {v['accuracy']:.1%} | {v['macro_f1']:.3f} | {te['accuracy']:.1%} | {te['macro_f1']:.3f} |")
    print("\npaired bootstrap, test accuracy minus text alone (95% interval):")
    for key, scores in [*chosen.items(), ("stacker", stacked["test"])]:
        lo, hi = paired_bootstrap(scores, d["test_text"], yt)
        fixed = int(((scores.argmax(1) == yt) & (d["test_text"].argmax(1) != yt)).sum())
        broken = int(((scores.argmax(1) != yt) & (d["test_text"].argmax(1) == yt)).sum())
        print(f"  {key}: [{lo:+.1%}, {hi:+.1%}]  (fixed {fixed}, broken {broken})")
    curve = {f"{w:g}": round(float((poe(d['val_text'], d['val_image_mean_log'], t, w).argmax(1) == yv).mean()), 4) for w in W_GRID[::4]}
    print("\nval accuracy by w (mean_log):", json.dumps(curve))
    curve = {f"{w:g}": round(float((poe(d['test_text'], d['test_image_mean_log'], t, w).argmax(1) == yt).mean()), 4) for w in W_GRID[::4]}
    print("test accuracy by w (mean_log, for reading only):", json.dumps(curve))


if __name__ == "__main__":
    main()
