"""Metric artifacts for a run folder, as the paper reports them and more."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from batchwbc.core import catalogue

from .calibration import reliability


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def summary_metrics(probs: np.ndarray, labels: np.ndarray, class_ids=catalogue.CLASS_IDS) -> dict:
    """Accuracy / macro-F1 over all classes and over the paper's ten (cells whose true class is
    one of the ten; a prediction outside them counts as an error)."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = probs.argmax(axis=1)
    paper_idx = [class_ids.index(c) for c in catalogue.PAPER_CLASS_IDS]
    m = np.isin(labels, paper_idx)
    out = {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", labels=list(range(len(class_ids))), zero_division=0)),
        "paper10_n": int(m.sum()),
        "paper10_accuracy": float(accuracy_score(labels[m], pred[m])) if m.any() else None,
        "paper10_macro_f1": float(f1_score(labels[m], pred[m], average="macro", labels=paper_idx, zero_division=0)) if m.any() else None,
    }
    per = f1_score(labels, pred, average=None, labels=list(range(len(class_ids))), zero_division=0)
    out["f1_per_class"] = {c: float(per[i]) for i, c in enumerate(class_ids)}
    return out


def write_artifacts(out: Path, split: str, probs: np.ndarray, labels: np.ndarray, sources: list[str]) -> dict:
    """Classification report, confusion matrix, ROC/AUC, per-source breakdown, reliability/ECE
    of one split, as files in `out`; returns what {split}_metrics.json holds.

    Each artefact is a function of its own, so one can be changed, or reused by an
    experiment, without reading the others."""
    ids = list(catalogue.CLASS_IDS)
    pred = probs.argmax(axis=1)
    rep = write_classification_report(out, split, labels, pred, ids)
    write_confusion_matrix(out, split, labels, pred, ids)
    aucs = plot_roc(out, split, probs, labels, ids)
    ece, bins = plot_reliability(out, split, probs, labels)
    result = {
        "summary": summary_metrics(probs, labels),
        "classification_report": rep,
        "auc": aucs,
        "ece": ece,
        "reliability_bins": bins,
        "per_source": per_source_metrics(pred, labels, sources, ids),
    }
    (out / f"{split}_metrics.json").write_text(json.dumps(result, indent=2))
    return result


def write_classification_report(out: Path, split: str, labels: np.ndarray, pred: np.ndarray, ids: list[str]) -> dict:
    """{split}_classification_report.txt (4 digits, every class); returns it as a dict."""
    from sklearn.metrics import classification_report

    k = len(ids)
    rep_txt = classification_report(labels, pred, labels=list(range(k)), target_names=ids, digits=4, zero_division=0)
    rep = classification_report(labels, pred, labels=list(range(k)), target_names=ids, output_dict=True, zero_division=0)
    (out / f"{split}_classification_report.txt").write_text(rep_txt)
    return rep


def write_confusion_matrix(out: Path, split: str, labels: np.ndarray, pred: np.ndarray, ids: list[str]) -> None:
    """{split}_confusion_matrix.csv (true rows, predicted columns) and its .png."""
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    k = len(ids)
    cm = confusion_matrix(labels, pred, labels=list(range(k)))
    with open(out / f"{split}_confusion_matrix.csv", "w") as fh:
        fh.write("true\\pred," + ",".join(ids) + "\n")
        for i, row in enumerate(cm):
            fh.write(ids[i] + "," + ",".join(str(int(v)) for v in row) + "\n")
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), ids, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), ids, fontsize=8)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7, color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix ({split})")
    fig.tight_layout()
    fig.savefig(out / f"{split}_confusion_matrix.png", dpi=110)
    plt.close(fig)


def plot_roc(out: Path, split: str, probs: np.ndarray, labels: np.ndarray, ids: list[str]) -> dict[str, float]:
    """{split}_roc.png, one-vs-rest; returns the AUC of each class that has positives and negatives."""
    from sklearn.metrics import auc, roc_curve

    plt = _plt()
    aucs = {}
    fig, ax = plt.subplots(figsize=(7, 6))
    for i, cid in enumerate(ids):
        y = labels == i
        if y.any() and (~y).any():
            fpr, tpr, _ = roc_curve(y, probs[:, i])
            aucs[cid] = float(auc(fpr, tpr))
            ax.plot(fpr, tpr, lw=1, label=f"{cid} (AUC {aucs[cid]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"One-vs-rest ROC ({split})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{split}_roc.png", dpi=110)
    plt.close(fig)
    return aucs


def plot_reliability(out: Path, split: str, probs: np.ndarray, labels: np.ndarray) -> tuple[float, list[dict]]:
    """{split}_reliability.png; returns the ECE and the reliability bins it is drawn from."""
    plt = _plt()
    ece, bins = reliability(probs, labels)
    fig, ax = plt.subplots(figsize=(5, 5))
    xs = [(b["lo"] + b["hi"]) / 2 for b in bins if b["n"]]
    ys = [b["accuracy"] for b in bins if b["n"]]
    ax.bar(xs, ys, width=1 / len(bins), edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability ({split}), ECE = {ece:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{split}_reliability.png", dpi=110)
    plt.close(fig)
    return ece, bins


def per_source_metrics(pred: np.ndarray, labels: np.ndarray, sources: list[str], ids: list[str]) -> dict:
    """Accuracy, per-class recall and predicted counts for each data source (lab) apart: a
    model good on average can fail one lab's stain."""
    src = np.asarray(sources)
    per_source = {}
    for s in sorted(set(sources)):
        m = src == s
        per_source[s] = {
            "n": int(m.sum()),
            "accuracy": float((pred[m] == labels[m]).mean()),
            "per_class": {
                ids[c]: {"n": int((labels[m] == c).sum()), "recall": float((pred[m][labels[m] == c] == c).mean())}
                for c in sorted(set(labels[m].tolist()))
            },
            "predicted": {ids[c]: int((pred[m] == c).sum()) for c in sorted(set(pred[m].tolist()))},
        }
    return per_source


def plot_history(history_csv: Path, out: Path) -> None:
    import csv

    plt = _plt()
    with open(history_csv) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    ep = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("accuracy", "loss")):
        ax.plot(ep, [float(r[key]) for r in rows], label=f"train {key}")
        if f"val_{key}" in rows[0]:
            ax.plot(ep, [float(r[f"val_{key}"]) for r in rows], label=f"val {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)
