"""`python -m ensemble.distill`: one student network learns from an ensemble, at 1x its cost.

An ensemble of M models costs M models at inference. A student (any timm model; by default the
best single member's architecture and configuration) trains on the train split against the
teacher's temperature-softened probabilities and the hard labels (Hinton et al. 2015; the loss is
`trainables.train.distillation_loss`), on Ray like any trial, from the search's shared start
when the search trained its architecture. It is a normal checkpoint
(`students/<name>/best.pt`), recorded as an MLflow run beside the search's, reported next to the
teacher and the best single model, and a row of every later `ensemble.build`.

Pseudo-labelling (`--pseudo-label PATH`): the teacher labels unlabelled images, and those it gives
at least `--pseudo-threshold` join the student's training images, the teacher's probabilities
their targets. An image whose decoded pixels equal a val or test image's, or that is one of their
files, never joins (nor do copies of labelled training images, which have labels already).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ensemble.combine import ensemble_metrics
from ensemble.combiners import BestSingle, Combined, Pool, Student, predict_members
from ensemble.folds import data_source
from ensemble.members import Member, SearchState, open_search, top_members
from ensemble.report import table_lines
from models.artifact import Vote, read
from models.predict import EnsembleModel, load, predictions_frame
from trainables.checkpoint import Checkpoint
from trainables.cli import CommonOptions, add_options, opt, run_main, start_ray, typed
from trainables.config import TrainConfig
from trainables.data import ImageData, read_unlabelled
from trainables.errors import UserError
from trainables.files import atomic_write, read_json, write_json
from trainables.inputs import Teacher
from trainables.start import Start
from trainables.store import code_version
from trainables.tracking import resolve_tracking_uri

log = logging.getLogger("ensemble")


@dataclass(frozen=True)
class DistillConfig(CommonOptions):
    """Every option of `python -m ensemble.distill`; the field help is the `--help` text."""

    teacher: str | None = opt(None, "Ensemble file to learn from (default: the one "
                              "ensemble.build chose, <experiment>/ensemble/ensemble.pt).")
    student: str | None = opt(None, "timm model of the student (default: the best single "
                              "member's).")
    pretrained_file: str | None = opt(None, "Local weights to start a student of another "
                                      "architecture from (default: the search's shared start "
                                      "when it trained that architecture, else random weights).")
    temperature: float = opt(Teacher.temperature, "Temperature that softens the teacher's and "
                             "the student's probabilities.")
    alpha: float = opt(Teacher.alpha, "Weight of the teacher's soft targets against the hard "
                       "labels, 0 to 1: alpha * T^2 * KL + (1 - alpha) * cross-entropy.")
    epochs: int | None = opt(None, "Training epochs (default: the best single member's).")
    pseudo_label: str | None = opt(None, "Unlabelled images (a folder or a CSV with an image "
                                   "column) that the teacher labels for the student.")
    pseudo_threshold: float = opt(0.9, "Lowest teacher probability of a pseudo-label that joins "
                                  "the student's training images.")


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    parser = argparse.ArgumentParser(
        prog="python -m ensemble.distill",
        description="Distil an ensemble into one student network (optionally with "
                    "pseudo-labelled images) and report it next to the teacher.")
    add_options(parser, DistillConfig)
    values = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    cfg = DistillConfig(**typed(DistillConfig, values))
    cfg.check_common()
    if cfg.temperature <= 0 or not 0 <= cfg.alpha <= 1:
        raise UserError(f"--temperature must be above 0 and --alpha within 0..1, not "
                        f"{cfg.temperature} and {cfg.alpha}")
    if not 0 < cfg.pseudo_threshold <= 1 or (cfg.epochs is not None and cfg.epochs < 1):
        raise UserError("--pseudo-threshold must be within (0, 1] and --epochs at least 1")
    if cfg.student:
        from trainables.models import check_model_name

        check_model_name(cfg.student)
    return cfg


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: distill(parse_args(argv)))


def distill(cfg: DistillConfig) -> int:
    start = time.time()
    state = open_search(cfg.storage, cfg.experiment)
    lock = state.store.lock()  # noqa: F841 - held while distilling: no search may write meanwhile
    teacher_path, teacher = open_teacher(state, cfg.teacher)
    best = top_members(state, 1)[0]
    student_cfg = student_config(cfg, best)
    pseudo = None
    if cfg.pseudo_label:
        pseudo = pseudo_labels(state, teacher, cfg.pseudo_label, threshold=cfg.pseudo_threshold,
                               image_col=cfg.image_col)
    name = student_name(student_cfg, teacher_path, pseudo,
                        f"{cfg.temperature:g},{cfg.alpha:g},{cfg.pretrained_file or ''}")
    path = state.store.student_checkpoint(name)
    reports = _train(cfg, state, student_cfg, teacher, pseudo, path)
    rows = _rows(state, best, teacher_path, teacher, path, student_cfg.model)
    doc = _report_doc(cfg, state, name, student_cfg, teacher_path, pseudo, rows)
    _write_report(path.parent, doc, rows)
    if pseudo is not None:  # which images the student took, as the teacher labelled them
        atomic_write(path.with_name("pseudo_labels.csv"), predictions_frame(
            pseudo.ids, pseudo.probs, state.data.class_names).to_csv(index=False))
    run_id = _log_to_mlflow(cfg, state, doc, reports, path.parent)
    if cfg.register:
        _register(cfg, state, path, doc, run_id)
    print("\n" + "\n".join(table_lines(rows, None)), flush=True)
    log.info("\n%s; student %s; report %s; MLflow run %s; %.0f s", _gap_sentence(doc), path,
             path.parent / "report.md", run_id, time.time() - start)
    return 0


# ---------------------------------------------------------------------- teacher and student


def open_teacher(state: SearchState, given: str | None) -> tuple[Path, EnsembleModel]:
    """The teacher ensemble, checked against the experiment: same classes, same image size."""
    path = Path(given).expanduser().resolve() if given else state.store.ensemble_dir / \
        "ensemble.pt"
    if not path.is_file():
        raise UserError(f"no teacher ensemble at {path}; run python -m ensemble.build "
                        f"--experiment {state.experiment} first, or pass --teacher FILE")
    try:
        teacher = load(path)
    except UserError:
        raise
    except Exception as exc:  # a truncated or foreign file: torch raises many kinds
        raise UserError(f"cannot read teacher {path} ({type(exc).__name__}); pass an ensemble "
                        "file written by ensemble.build") from None
    classes = state.data.class_names
    if teacher.class_names != classes:
        raise UserError(f"teacher {path} knows {len(teacher.class_names)} classes "
                        f"({', '.join(teacher.class_names[:5])}...) but experiment "
                        f"{state.experiment!r} has {len(classes)} ({', '.join(classes[:5])}...); "
                        "pass a teacher built from this experiment")
    size = int(state.data.images.shape[1])
    if teacher.image_size != size:
        raise UserError(f"teacher {path} takes {teacher.image_size} px images but experiment "
                        f"{state.experiment!r} decoded them at {size} px; pass a teacher built "
                        "from this experiment")
    return path, teacher


def student_config(cfg: DistillConfig, best: Member) -> TrainConfig:
    """The best single member's training settings, with the student's model and the
    distillation settings; mixup is off (the teacher's targets replace mixed labels)."""
    base = Checkpoint.load(best.checkpoint).train_config
    return dataclasses.replace(base, model=cfg.student or base.model,
                               epochs=cfg.epochs or base.epochs, mixup=0.0, cutmix=0.0,
                               keep_last=0)


def student_start(state: SearchState, model: str, pretrained_file: str | None = None
                  ) -> tuple[Start, str]:
    """(start, where from) of the student: the search's shared start of its architecture, else
    a seeded random start (or --pretrained-file) normalised like the search."""
    from trainables.models import create_model

    init = state.store.read_init(model)
    if init.model == model and not pretrained_file:
        return init, f"shared start ({init.kind})"
    torch.manual_seed(state.seed)
    net = create_model(model, state.data.num_classes, pretrained_file=pretrained_file)
    where = f"pretrained file {pretrained_file}" if pretrained_file else "random weights"
    kind = "pretrained" if pretrained_file else "random"
    return Start(net.state_dict(), init.mean, init.std, kind, model=model), where


def student_name(cfg: TrainConfig, teacher_path: Path, pseudo: PseudoLabels | None,
                 extra: str = "") -> str:
    """<model>-<hash> of everything the student learns from: its settings (threads aside), the
    teacher's files, the pseudo-labelled images and `extra` (temperature, alpha, start); a
    finished one is not trained again."""
    h = hashlib.sha256(json.dumps(cfg.recipe(), sort_keys=True, default=list).encode())
    h.update(extra.encode())
    h.update(_files_digest(teacher_path).encode())
    if pseudo is not None:
        h.update(",".join(sorted(pseudo.hashes)).encode())
    return f"{cfg.model}-{h.hexdigest()[:10]}"


def _files_digest(path: Path) -> str:
    """A digest of an ensemble file and, for a vote, of its members' files."""
    h = hashlib.blake2b(path.read_bytes(), digest_size=16)
    saved = read(path)
    for member in saved.members if isinstance(saved, Vote) else []:
        h.update(Path(member).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------- pseudo-labels


@dataclass
class PseudoLabels:
    """The unlabelled images the student trains on, with the teacher's probabilities."""

    images: np.ndarray
    ids: list[str]
    probs: np.ndarray
    hashes: list[str]
    facts: dict


def pseudo_labels(state: SearchState, teacher: EnsembleModel, path: str, *, threshold: float,
                  image_col: str = "image_path") -> PseudoLabels:
    """Unlabelled images the teacher labels with at least `threshold`; unreadable images and
    images of a size the labelled ones do not have are skipped with a warning naming the file,
    and no image of val or test (by pixel content or by file) ever joins."""
    if not Path(path).expanduser().exists():
        raise UserError(f"--pseudo-label {path} does not exist; pass a folder of images or a "
                        "CSV with an --image-col column")
    size = int(state.data.images.shape[1])
    images, ids = read_unlabelled(path, image_size=size, image_col=image_col)
    root = Path(path).expanduser()
    root = root if root.is_dir() else root.parent
    hashes = [pixel_hash(im) for im in images]
    sized = _sized_like_labelled(state, [root / i for i in ids])
    held, labelled = _held_out_copies(state, root, ids, hashes)
    keep = np.flatnonzero(sized & ~held & ~labelled)
    probs = teacher.predict_proba(images[keep]) if len(keep) else \
        np.zeros((0, state.data.num_classes))
    confident = probs.max(1, initial=0.0) >= threshold
    taken, probs = keep[confident], probs[confident]
    counts = np.bincount(probs.argmax(1), minlength=state.data.num_classes)
    facts = {"source": str(path), "threshold": threshold, "readable": len(ids),
             "wrong_size": int((~sized).sum()), "copies_of_val_or_test": int(held.sum()),
             "copies_of_labelled_train": int((labelled & ~held).sum()),
             "candidates": len(keep), "taken": len(taken),
             "per_class": dict(zip(state.data.class_names, counts.tolist()))}
    log.info("pseudo-labels: %d of %d readable images taken at >= %.2f (%d skipped as copies "
             "of val/test images, %d of labelled ones, %d of another size)", len(taken),
             len(ids), threshold, facts["copies_of_val_or_test"],
             facts["copies_of_labelled_train"], facts["wrong_size"])
    return PseudoLabels(images[taken], [ids[i] for i in taken], probs.astype(np.float32),
                        [hashes[i] for i in taken], facts)


def pixel_hash(image: np.ndarray) -> str:
    """Content hash of a decoded image: two files decode alike exactly when their pixels do."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def _held_out_copies(state: SearchState, root: Path, ids: list[str], hashes: list[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(copies of a val or test image, copies of a labelled train image) among the unlabelled
    images: by decoded pixels, and for val/test also by file (the search's own files)."""
    data, split = state.data, state.split
    held = np.concatenate([split.val, split.test])
    held_px = {pixel_hash(data.images[i]) for i in held}
    train_px = {pixel_hash(data.images[i]) for i in split.train}
    by_pixels = np.array([h in held_px for h in hashes], bool)
    source = data_source(state)
    base = None if source is None else source if source.is_dir() else source.parent
    held_files = {(base / data.ids[i]).resolve() for i in held} if base else set()
    by_file = np.array([(root / i).resolve() in held_files for i in ids], bool)
    return by_pixels | by_file, np.array([h in train_px for h in hashes], bool)


def _sized_like_labelled(state: SearchState, files: list[Path]) -> np.ndarray:
    """Whether each file's width and height lie within those of the labelled images (from the
    search's data report); others are skipped with a warning naming the file."""
    from PIL import Image

    report = state.store.data_report_dir / "report.json"
    doc = read_json(report) if report.is_file() else {}
    if not (doc.get("width") and doc.get("height")):
        log.warning("no image sizes in %s's data report: pseudo-label image sizes are not "
                    "checked", state.experiment)
        return np.ones(len(files), bool)
    (w_lo, w_hi), (h_lo, h_hi) = ((doc[k]["min"], doc[k]["max"]) for k in ("width", "height"))
    ok = np.ones(len(files), bool)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            w, h = im.size
        if not (w_lo <= w <= w_hi and h_lo <= h <= h_hi):
            ok[i] = False
            log.warning("skipping pseudo-label image %s: it is %dx%d, but the labelled images "
                        "are %s wide and %s high", f, w, h, _span(w_lo, w_hi), _span(h_lo, h_hi))
    return ok


def _span(low: float, high: float) -> str:
    return f"{low:g}" if low == high else f"{low:g} to {high:g}"


def student_data(state: SearchState, teacher: EnsembleModel, pseudo: PseudoLabels | None
                 ) -> tuple[ImageData, np.ndarray, np.ndarray]:
    """(images the student may see, the teacher's probabilities per image, its training
    indices): the search's data with the pseudo-labelled images appended, labelled with the
    teacher's top class. Val and test rows of the targets stay zero: never trained on."""
    data, train = state.data, state.split.train
    soft = np.zeros((len(data.labels), data.num_classes), np.float32)
    soft[train] = teacher.predict_proba(data.images[train])
    if pseudo is None or not len(pseudo.ids):
        return data, soft, train
    n = len(data.labels)
    joined = ImageData(images=np.concatenate([data.images, pseudo.images]),
                       labels=np.concatenate([data.labels, pseudo.probs.argmax(1)]),
                       class_names=data.class_names,
                       ids=data.ids + [f"pseudo:{i}" for i in pseudo.ids], source=data.source)
    return (joined, np.concatenate([soft, pseudo.probs]),
            np.concatenate([train, np.arange(n, n + len(pseudo.ids))]))


# ---------------------------------------------------------------------- training


def _train(cfg: DistillConfig, state: SearchState, student_cfg: TrainConfig,
           teacher: EnsembleModel, pseudo: PseudoLabels | None, path: Path) -> list[dict]:
    """Trains the student through the training service (an interrupted one continues from its
    last epoch); a finished one is reused. Returns its per-epoch reports."""
    from trainables.jobs import TrainJob, reports_of, train
    from trainables.store import finished

    if finished(path):
        log.info("student %s already trained: reusing it", path.parent.name)
        return reports_of(path)
    import ray

    data, soft, train_idx = student_data(state, teacher, pseudo)
    start, where = student_start(state, student_cfg.model, cfg.pretrained_file)
    log.info("student %s: %s from %s on %d training images (%d train + %d pseudo-labelled), "
             "T=%g, alpha=%g", path.parent.name, student_cfg.model, where, len(train_idx),
             len(state.split.train), len(train_idx) - len(state.split.train), cfg.temperature,
             cfg.alpha)
    owns = start_ray(cfg.address, cfg.num_cpus)
    try:
        inputs = start.inputs(data, train_idx, state.split.val, split_hash=state.split.hash,
                              teacher=Teacher(soft, cfg.temperature, cfg.alpha))
        return train([TrainJob(student_cfg, inputs, path, name="student")],
                     ray_dir=state.store.ray_dir)[0].reports
    finally:
        if owns:
            ray.shutdown()


# ---------------------------------------------------------------------- report


def _rows(state: SearchState, best: Member, teacher_path: Path, teacher: EnsembleModel,
          student: Path, model: str) -> list[Combined]:
    """Best single model, teacher and student, scored alike (the ensemble report's columns)."""
    pool = Pool(state, predict_members(state, [best], []), [], metric=state.store.metric)
    return [BestSingle().fit(pool), _teacher_row(pool, teacher_path, teacher),
            Student(student, name=f"student ({model})").fit(pool)]


def _teacher_row(pool: Pool, path: Path, teacher: EnsembleModel) -> Combined:
    images, split = pool.state.data.images, pool.state.split
    teacher.predict_proba(images[split.test[:64]])  # warm-up, outside the timed region
    val = teacher.predict_proba(images[split.val])
    tick = time.perf_counter()
    test = teacher.predict_proba(images[split.test])
    ms = 1000 * (time.perf_counter() - tick) / max(len(split.test), 1)
    saved = read(path)
    members = [pool.state.store.relative(m) for m in saved.members] \
        if isinstance(saved, Vote) else [path.name]
    name = _chosen_name(pool.state, path)
    return Combined(f"teacher ({name})", list(members), list(teacher.weights),
                    ensemble_metrics(val, pool.y_val), ensemble_metrics(test, pool.y_test),
                    sum(p.numel() for m in teacher.models for p in m.parameters()), ms,
                    test_probs=test, note=f"teacher: {pool.state.store.relative(path)}")


def _chosen_name(state: SearchState, path: Path) -> str:
    """The ensemble.build row the teacher is (its report says which it chose), else its file."""
    report = state.store.ensemble_dir / "report.json"
    if path == state.store.ensemble_dir / "ensemble.pt" and report.is_file():
        return read_json(report).get("chosen", path.name)
    return path.name


def _report_doc(cfg: DistillConfig, state: SearchState, name: str, student_cfg: TrainConfig,
                teacher_path: Path, pseudo: PseudoLabels | None, rows: list[Combined]) -> dict:
    best, teacher, student = (r.test["accuracy"] for r in rows)
    gap = teacher - best
    return {"experiment": state.experiment, "student": name,
            "checkpoint": state.store.relative(state.store.student_checkpoint(name)),
            "teacher": state.store.relative(teacher_path), "temperature": cfg.temperature,
            "alpha": cfg.alpha, "config": dataclasses.asdict(student_cfg),
            "split_hash": state.split.hash, "split_sizes": state.split.sizes(),
            "pseudo": pseudo.facts if pseudo else None, "rows": [r.record() for r in rows],
            "gap_closed": (student - best) / gap if gap > 0 else None, "code": code_version()}


def _gap_sentence(doc: dict) -> str:
    best, teacher, student = (r["test"]["accuracy"] for r in doc["rows"])
    if doc["gap_closed"] is None:
        return (f"the teacher ({teacher:.4f}) is not ahead of the best single model "
                f"({best:.4f}) on test: there is no gap to close; the student has {student:.4f}")
    verdict = "closes" if doc["gap_closed"] >= 0.5 else "does NOT close"
    return (f"test accuracy: best single {best:.4f}, teacher {teacher:.4f}, student "
            f"{student:.4f}: the student {verdict} half of the teacher's gap "
            f"({doc['gap_closed']:.0%} of it) at 1x cost")


def _write_report(out: Path, doc: dict, rows: list[Combined]) -> None:
    md = [f"# Distilled student: {doc['experiment']}", "",
          f"Student {doc['student']} ({doc['config']['model']}, {doc['config']['epochs']} "
          f"epochs) learnt from {doc['teacher']} at T={doc['temperature']:g}, "
          f"alpha={doc['alpha']:g} on the train split ({doc['split_sizes']['train']} images); "
          f"val {doc['split_sizes']['val']} images, test {doc['split_sizes']['test']} "
          "(reported only).", "", *table_lines(rows, None), "", _gap_sentence(doc) + "."]
    p = doc["pseudo"]
    if p:
        md += ["", f"## Pseudo-labels from {p['source']} (teacher probability >= "
               f"{p['threshold']:g})", "",
               f"{p['taken']} of {p['readable']} readable images taken; skipped: "
               f"{p['copies_of_val_or_test']} copies of val or test images, "
               f"{p['copies_of_labelled_train']} copies of labelled training images, "
               f"{p['wrong_size']} of another size.", "", "| class | taken |", "|---|---|",
               *(f"| {c} | {n} |" for c, n in p["per_class"].items())]
    write_json(out / "report.json", doc)
    atomic_write(out / "report.md", "\n".join(md) + "\n")


def _tracking_uri(cfg: DistillConfig, state: SearchState) -> str:
    """--tracking-uri, else the search's, else MLflow's default here."""
    tracking = state.store.read_tracking(follow=not cfg.tracking_uri) or {}
    return resolve_tracking_uri(cfg.tracking_uri) if cfg.tracking_uri else \
        tracking.get("tracking_uri") or resolve_tracking_uri(None)


def _log_to_mlflow(cfg: DistillConfig, state: SearchState, doc: dict, reports: list[dict],
                   out: Path) -> str:
    """An MLflow run beside the search's: the student's settings, its per-epoch curves, and
    the test figures of the student, the teacher and the best single model."""
    from mlflow.entities import Metric

    from trainables.tracking import client_for, experiment_id, flat_params, log_params

    tracking = state.store.read_tracking(follow=not cfg.tracking_uri) or {}
    client = client_for(_tracking_uri(cfg, state))
    tags = {"kind": "student", **code_version()}
    if tracking.get("parent_run_id"):
        tags["search_run_id"] = tracking["parent_run_id"]
    run = client.create_run(experiment_id(client, state.experiment, create=True),
                            run_name=f"student-{doc['student']}", tags=tags)
    rid = run.info.run_id
    log_params(client, rid, flat_params({"train": doc["config"], "teacher": doc["teacher"],
                                         "kd_temperature": cfg.temperature,
                                         "kd_alpha": cfg.alpha,
                                         "pseudo_label": cfg.pseudo_label or "none",
                                         "pseudo_threshold": cfg.pseudo_threshold}))
    now = int(time.time() * 1000)
    curves = [Metric(k, float(r[k]), now, int(r["epoch"])) for r in reports
              for k in ("train_loss", "val_loss", "val_acc", "val_f1", "lr") if k in r]
    for row, prefix in zip(doc["rows"], ("best_single.", "teacher.", "")):
        curves += [Metric(f"{prefix}{split}_{k}", float(v), now, 0)
                   for split in ("val", "test") for k, v in row[split].items()]
        curves.append(Metric(f"{prefix}ms_per_image", float(row["ms_per_image"]), now, 0))
    if doc["pseudo"]:
        curves.append(Metric("pseudo_taken", float(doc["pseudo"]["taken"]), now, 0))
    for i in range(0, len(curves), 500):
        client.log_batch(rid, metrics=curves[i:i + 500])
    for name in ("report.json", "report.md"):
        client.log_artifact(rid, str(out / name))
    client.set_terminated(rid, "FINISHED")
    return rid


def _register(cfg: DistillConfig, state: SearchState, path: Path, doc: dict,
              run_id: str) -> None:
    """With --register, the student as a new version of a registered MLflow model."""
    from models.pyfunc import describe, register

    uri = _tracking_uri(cfg, state)
    student = doc["rows"][-1]
    version = register(path, name=cfg.register, uri=uri, run_id=run_id,
                       examples=state.data.images[state.split.test[:2]],
                       description=describe(f"student ({doc['config']['model']})",
                                            state.experiment, state.data.class_names,
                                            student["test"]))
    log.info("registered %r version %d; serve it with: MLFLOW_TRACKING_URI=%s mlflow models "
             "serve -m models:/%s/%d --env-manager local", cfg.register, version, uri,
             cfg.register, version)


if __name__ == "__main__":
    sys.exit(main())
