"""The honest report: a table of every combiner on val and test, as JSON, Markdown, a picture
and an MLflow run next to the search."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ensemble.combiners import Combined
from models.predict import AUTO
from trainables.files import atomic_write, write_json

COLUMNS = ("val acc", "test acc", "test F1", "test NLL", "test ECE", "members", "params",
           "ms/img")


def table_lines(rows: list[Combined], chosen: Combined | None) -> list[str]:
    """A Markdown table; the row chosen on val (if any) is marked."""
    head = "| combiner | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        mark = " **(chosen)**" if r is chosen else ""
        cells = [f"{r.val['accuracy']:.4f}", f"{r.test['accuracy']:.4f}", f"{r.test['f1']:.4f}",
                 f"{r.test['loss']:.4f}", f"{r.test['ece']:.4f}", str(len(r.members)),
                 f"{r.params / 1e6:.2f}M", f"{r.ms_per_image:.3f}"]
        lines.append(f"| {r.name}{mark} | " + " | ".join(cells) + " |")
    return lines


def tta_words(tta: list[str]) -> str:
    if tta == [AUTO]:
        return "auto (each model averages over a horizontal flip where it trained with flips)"
    return ", ".join(tta) or "none"


def write_report(out: Path, doc: dict[str, Any], rows: list[Combined], chosen: Combined) -> None:
    """report.json, report.md and comparison.png in `out`."""
    write_json(out / "report.json", doc)
    notes = [f"- {r.name}: {r.note}" for r in rows if r.note]
    md = [f"# Ensemble report: {doc['experiment']}", "",
          f"Members ({len(doc['members'])}): " + ", ".join(m["name"] for m in doc["members"]),
          (f"Split {doc['split_hash']}: val {doc['split_sizes']['val']} images (every choice "
           f"is made here), test {doc['split_sizes']['test']} images (reported only)."),
          f"TTA views: {tta_words(doc['tta'])}.", "", *table_lines(rows, chosen), "",
          (f"Chosen on val: **{chosen.name}** (of the rows within one standard error of the "
           "highest val score, the lowest val NLL, then fewest parameters). Vote weights are "
           "fit on val, so the weighted vote's val score is optimistic; its test score is not."),
          "", *cv_lines(doc), *notes]
    atomic_write(out / "report.md", "\n".join(md) + "\n")
    comparison_figure(rows).savefig(out / "comparison.png", dpi=120)


def cv_lines(doc: dict[str, Any]) -> list[str]:
    """With --folds: each configuration's CV score (mean ± std over folds) beside its holdout
    val score, and how the folds were drawn."""
    if not doc.get("cv"):
        return []
    f = doc["folds"]
    how = (f"grouped by {f['group_col']!r} and identical images" if f["group_col"]
           else "identical images kept together" if f["grouped"] else "stratified")
    lines = [f"## Cross-validation: {f['k']} folds of train + val ({f['images']} images, {how}; "
             f"folds/{f['key']}/)", "",
             f"| configuration | holdout val accuracy | CV {f['metric']} (mean ± std over "
             f"folds) | OOF {f['metric']} | OOF NLL |", "|---|---|---|---|---|"]
    for c in doc["cv"]:
        lines.append(f"| {c['config']} | {c['holdout_val']:.4f} | {c['cv_mean']:.4f} ± "
                     f"{c['cv_std']:.4f} | {c['oof'][f['metric']]:.4f} | {c['oof']['loss']:.4f} |")
    lines += ["", "Rows named 'folds ...' average each configuration's fold models; their val "
              "column is the out-of-fold score over all train + val images, and their vote "
              "weights are fit on out-of-fold predictions.", ""]
    return lines


def comparison_figure(rows: list[Combined]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [r for r in rows if not r.skipped]
    x = np.arange(len(shown))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(x - 0.2, [r.val["accuracy"] for r in shown], 0.4, label="val")
    ax1.bar(x + 0.2, [r.test["accuracy"] for r in shown], 0.4, label="test")
    low = min(min(r.val["accuracy"], r.test["accuracy"]) for r in shown)
    ax1.set_ylim(max(0.0, low - 0.05), 1.0)
    ax1.set_title("accuracy (chosen on val, reported on test)")
    ax2.bar(x, [r.test["loss"] for r in shown], 0.6, color="tab:red")
    ax2.set_title("test NLL (lower is better)")
    for ax in (ax1, ax2):
        ax.set_xticks(x, [r.name for r in shown], rotation=30, ha="right")
    ax1.legend(loc="lower left")
    fig.tight_layout()
    return fig


def log_to_mlflow(uri: str, experiment: str, parent_run_id: str | None, doc: dict[str, Any],
                  rows: list[Combined], out: Path) -> str:
    """An MLflow run beside the search: the table as metrics, members and weights as params."""
    from trainables.store import code_version
    from trainables.tracking import client_for, experiment_id, log_params

    client = client_for(uri)
    exp_id = experiment_id(client, experiment, create=True)
    tags = {"kind": "ensemble", **code_version()}
    if parent_run_id:
        tags["search_run_id"] = parent_run_id
    run = client.create_run(exp_id, run_name=f"ensemble-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags=tags)
    rid = run.info.run_id
    log_params(client, rid, {"top": str(doc["top"]), "seeds": str(doc["seeds"]),
                             "tta": ",".join(doc["tta"]) or "none", "chosen": doc["chosen"],
                             "members": json.dumps([m["name"] for m in doc["members"]])})
    for r in rows:
        key = r.name.replace(" ", "_")
        log_params(client, rid, {f"{key}.weights": json.dumps(dict(zip(r.members, r.weights)))})
        for split, metrics in (("val", r.val), ("test", r.test)):
            for k, v in metrics.items():
                if not math.isnan(v):  # NaN rows (skipped soups) are left out
                    client.log_metric(rid, f"{key}.{split}_{k}", float(v))
        if not math.isnan(r.ms_per_image):
            client.log_metric(rid, f"{key}.ms_per_image", float(r.ms_per_image))
    if doc.get("folds"):
        log_params(client, rid, {"folds": str(doc["folds"]["k"]),
                                 "group_col": str(doc["folds"]["group_col"])})
    for c in doc.get("cv", []):
        client.log_metric(rid, f"cv.{c['config']}.mean", c["cv_mean"])
        client.log_metric(rid, f"cv.{c['config']}.std", c["cv_std"])
    for name in ("report.json", "report.md", "comparison.png"):
        client.log_artifact(rid, str(out / name))
    client.set_terminated(rid, "FINISHED")
    return rid
