"""Does fine-tuning the last EfficientNet-Lite blocks beat the frozen head on real photos? (issue 9)

    python benchmarks/tail_finetune_probe.py --clean-dir /tmp/real/w224/clean \\
        --cache /tmp/real/lite2_cut16.pt --tails 0,1,2,3 --out benchmarks/results/tail_finetune_probe.json

No GPU is lent to this project, and fine-tuning through the whole backbone on two CPU cores costs
~15 min per epoch for the 7.5k real photos (Lite2 at 260 px). The frozen part of a partly
fine-tuned backbone gives the same output every epoch, though, so its activations at the cut
(the input of block `--cut`) are computed once and stored, and only the tail (the last `tail`
MBConv blocks + the head conv) and the classifier head train on them. Augmentation is a
horizontal flip of the stored activation maps (the conv stack is nearly flip-equivariant).

Reported per tail length, on the val split only (settings are chosen there): per-photo accuracy,
per-product accuracy (mean of log-probabilities) and image -> image precision@10 of the tail's
pooled features and of the head's penultimate layer. tail 0 = today's frozen head (the same head,
lr, label smoothing, weight decay and early stopping on val loss as `train.image`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline_steps import runtime_env  # noqa: E402

runtime_env.apply()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline_steps import datasets as ds  # noqa: E402
from pipeline_steps import image_eval, models  # noqa: E402
from pipeline_steps.recipe_image import _clean_image_size, same_category_precision  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean-dir", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="where the activations at the cut are stored (reused)")
    p.add_argument("--cut", type=int, default=16, help="block index whose input is stored (lite2: 16 = the 9x9 stage)")
    p.add_argument("--tails", default="0,conv,1", help="comma-separated: 0 (head only), conv (+ head conv), n (+ last n blocks)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--lr-head", type=float, default=3e-4)
    p.add_argument("--lr-tail", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--flip", type=int, default=1, help="1: random horizontal flip of the stored maps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    return p.parse_args()


def extract_cut(net: nn.Module, preprocessor, paths, cut: int, batch: int = 32) -> torch.Tensor:
    net.eval()
    out = []
    with torch.inference_mode(), tqdm(total=len(paths), desc=f"activations at block {cut}", mininterval=5) as bar:
        for start in range(0, len(paths), batch):
            x = torch.stack([preprocessor(ds.load_rgb(p)) for p in paths[start : start + batch]])
            x = net._swish(net._bn0(net._conv_stem(x)))
            for block in net._blocks[:cut]:
                x = block(x)
            out.append(x.half())
            bar.update(len(x))
    return torch.cat(out)


class Tail(nn.Module):
    """The trainable end of the backbone + the classifier head, on the frozen part's stored output.

    tail "0": nothing of the backbone trains (input: pooled features, today's frozen head);
    "conv": the head conv (1x1, 352 -> 1280) + its BatchNorm train (input: the last block's output);
    n >= 1: the last n MBConv blocks + the head conv train (input: block n_total - n's input).
    """

    def __init__(self, net: nn.Module, tail: str, n_classes: int, params: dict) -> None:
        super().__init__()
        n_total = len(net._blocks)
        self.tail = tail
        self.first = n_total - int(tail) if tail not in ("0", "conv") else n_total
        self.blocks = nn.ModuleList(copy.deepcopy(list(net._blocks[self.first :]))) if tail != "0" else nn.ModuleList()
        self.conv_head, self.bn1 = copy.deepcopy(net._conv_head), copy.deepcopy(net._bn1)
        self.swish, self.n_total = net._swish, n_total
        self.drop_connect = net._global_params.drop_connect_rate or 0.0
        self.embedding = nn.Linear(1280, params["embedding_dim"])
        self.dropout = nn.Dropout(params["dropout"])
        self.classifier = nn.Linear(params["embedding_dim"], n_classes)

    def train(self, mode: bool = True):  # BatchNorm keeps its pretrained statistics (small batches of 9x9 maps)
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.tail == "0":
            return x
        for i, block in enumerate(self.blocks):
            rate = self.drop_connect * float(self.first + i) / self.n_total if self.training else 0.0
            x = block(x, drop_connect_rate=rate)
        return self.swish(self.bn1(self.conv_head(x))).mean(dim=(2, 3))

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.embedding(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(self.features(x))))


@torch.inference_mode()
def frozen_part(net: nn.Module, acts: torch.Tensor, cut: int, tail: str, batch: int = 128) -> torch.Tensor:
    """The frozen blocks between the cut and the trainable tail, run once (pooled features for tail 0)."""
    n_total = len(net._blocks)
    stop = n_total - int(tail) if tail not in ("0", "conv") else n_total
    net.eval()
    out = []
    for start in tqdm(range(0, len(acts), batch), desc=f"frozen blocks {cut}..{stop - 1}", mininterval=5):
        x = acts[start : start + batch].float()
        for block in net._blocks[cut:stop]:
            x = block(x)
        if tail == "0":
            x = net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))
        out.append(x)
    return torch.cat(out)


@torch.inference_mode()
def run_eval(model: Tail, acts: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model.eval()
    logits, feats, embs = [], [], []
    for start in range(0, len(acts), batch):
        f = model.features(acts[start : start + batch].float())
        e = model.embed(f)
        feats.append(f), embs.append(e), logits.append(model.classifier(e))
    return torch.cat(logits).numpy(), torch.cat(feats).numpy(), torch.cat(embs).numpy()


def train_one(net, acts, frame, classes, tail: str, args, params) -> dict:
    torch.manual_seed(args.seed)
    prepared = time.perf_counter()
    acts = frozen_part(net, acts, args.cut, tail)
    prepared = time.perf_counter() - prepared
    model = Tail(net, tail, len(classes), params)
    split = frame["split"].to_numpy()
    y = torch.tensor(frame["label"].to_numpy())
    tr, va = np.flatnonzero(split == "train"), np.flatnonzero(split == "val")
    head = [*model.embedding.parameters(), *model.classifier.parameters()]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(("embedding", "classifier"))] if tail != "0" else []
    groups = [{"params": head, "lr": args.lr_head}] + ([{"params": backbone, "lr": args.lr_tail}] if backbone else [])
    opt = torch.optim.AdamW(groups, weight_decay=params["weight_decay"])
    steps = args.epochs * math.ceil(len(tr) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params["label_smoothing"])
    best, best_state, bad, history = math.inf, None, 0, []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(tr))
        total = 0.0
        for start in range(0, len(tr), args.batch_size):
            idx = tr[order[start : start + args.batch_size].numpy()]
            x = acts[idx].float()
            if args.flip and x.dim() == 4:
                flip = torch.rand(len(idx)) < 0.5
                x[flip] = x[flip].flip(3)
            loss = loss_fn(model(x), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        logits, _, _ = run_eval(model, acts[va])
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), y[va]))
        val_acc = float((logits.argmax(1) == y[va].numpy()).mean())
        history.append({"epoch": epoch, "train_loss": round(total / len(tr), 4), "val_loss": round(val_loss, 4), "val_acc": round(val_acc, 4), "s": round(time.perf_counter() - started)})
        print(f"tail {tail} epoch {epoch}: {history[-1]}", flush=True)
        if val_loss < best:
            best, best_state, bad = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= args.patience:
                break
    model.load_state_dict(best_state)
    keep = np.flatnonzero(np.isin(split, ["train", "val"]))
    logits, feats, embs = run_eval(model, acts[keep])
    sub = frame.iloc[keep].reset_index(drop=True)
    labels, products = sub["label"].to_numpy(), sub["product_id"].astype(str).to_numpy()
    queries = np.flatnonzero(sub["split"].to_numpy() == "val")
    proba = torch.softmax(torch.from_numpy(logits[queries]), 1).numpy()
    _, plabels, pooled = image_eval.pool_by_product(proba, products[queries], labels[queries], "mean_log")
    return {
        "tail": tail,
        "val_per_photo": round(float((proba.argmax(1) == labels[queries]).mean()), 4),
        "val_per_product": round(float((pooled.argmax(1) == plabels).mean()), 4),
        "val_p10_backbone": round(same_category_precision(feats, labels, products, queries), 4),
        "val_p10_head": round(same_category_precision(embs, labels, products, queries), 4),
        "best_epoch": int(min(history, key=lambda h: h["val_loss"])["epoch"]),
        "frozen_part_seconds": round(prepared),
        "train_seconds": round(time.perf_counter() - started),
        "history": history,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["image"]
    spec = models.describe_weights(params["backbone"], params["weights"])
    classifier = models.build_image_classifier({**params, "freeze_backbone": False}, 13)
    net = classifier.backbone.net
    data = ds.load_clean(args.clean_dir)
    frame = data.images_of(None)
    paths = [data.clean_dir / p for p in frame["path"]]
    preprocessor = models.build_image_preprocessor(params, spec, _clean_image_size(data, paths[:1]))
    if args.cache.is_file():
        stored = torch.load(args.cache, weights_only=True)
        assert stored["paths"] == [str(p) for p in paths], "cache of another clean folder"
        acts = stored["acts"]
    else:
        t = time.perf_counter()
        acts = extract_cut(net, preprocessor, paths, args.cut)
        torch.save({"paths": [str(p) for p in paths], "acts": acts, "cut": args.cut, "seconds": time.perf_counter() - t}, args.cache)
    results = {"backbone": params["backbone"], "input_size": preprocessor.input_size, "cut": args.cut, "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    for tail in args.tails.split(","):
        run = train_one(net, acts, frame, data.classes, tail, args, params)
        print(json.dumps({k: v for k, v in run.items() if k != "history"}), flush=True)
        results["runs"].append(run)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
