"""Every training setting in one place: its type, default, help text, allowed values and limits.

`TrainConfig` is the one list. The search config, its command-line flags and YAML keys, the search
space's checks and what reaches a trial are all derived from it, so adding a training setting is
one field here plus its use in the training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from trainables.defaults import TRAIN
from trainables.errors import UserError

SCHEDULERS = ("cosine", "step", "onecycle", "plateau", "constant")
OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "fp16", "bf16", "off")
POLICIES = ("none", "light", "strong")
METRICS = ("accuracy", "f1")
BALANCING = ("none", "sqrt", "balanced")
AUGMENT_DEVICES = ("auto", "cpu", "cuda")
DEVICE_DATA = ("auto", "resident", "stream")

# limits a numeric setting can carry: > 0, >= 0, [0, 1), (0, 1]
POSITIVE, NON_NEGATIVE, UNIT, FRACTION = "positive", "non-negative", "unit", "fraction"


def setting(name: str, help: str, *, choices: tuple | None = None, limit: str | None = None,
            searchable: bool = True, flag: bool = True, **cli: Any) -> Any:
    """A TrainConfig field with what the CLI, the YAML reader and the space checks need.

    Args:
        name: The field's name; its default (when neither the user nor the search sets one)
            is `trainables.defaults.TRAIN[name]`.
        help: One sentence for `--help`.
        choices: The allowed values of a text setting.
        limit: POSITIVE, NON_NEGATIVE, UNIT ([0, 1)) or FRACTION ((0, 1]) for a number.
        searchable: Whether the search space may vary it.
        flag: Whether it is a user option (flag and YAML key); internal settings are not.
        cli: How `trainables.cli.add_options` makes its flag (e.g. cli_list=True: repeatable).
    """
    return field(default=TRAIN[name], metadata={"help": help, "choices": choices, "limit": limit,
                                            "searchable": searchable, "flag": flag, **cli})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs to know, flat so it logs as MLflow params."""

    model: str = setting("model", "timm model name (searchable: each architecture gets a shared "
                                  "start of its own).")
    lr: float = setting("lr", "Peak learning rate.", limit=POSITIVE)
    weight_decay: float = setting("weight_decay", "Weight decay (decoupled for AdamW).",
                                                  limit=NON_NEGATIVE)
    batch_size: int = setting("batch_size", "Images per batch and worker.", limit=POSITIVE)
    dropout: float = setting("dropout", "Dropout before the classifier.", limit=UNIT)
    epochs: int = setting("epochs", "Training epochs.", limit=POSITIVE)
    scheduler: str = setting("scheduler", "Learning-rate schedule.", choices=SCHEDULERS)
    warmup_epochs: int = setting("warmup_epochs", "Linear learning-rate warmup epochs before the "
                                                  "schedule.", limit=NON_NEGATIVE)
    optimizer: str = setting("optimizer", "Optimizer (timm's factory).", choices=OPTIMIZERS)
    momentum: float = setting("momentum", "SGD momentum.", limit=UNIT)
    label_smoothing: float = setting("label_smoothing", "Label smoothing of the cross-entropy "
                                                        "loss.", limit=UNIT)
    mixup: float = setting("mixup", "Mixup alpha (0 turns mixup off).", limit=NON_NEGATIVE)
    cutmix: float = setting("cutmix", "CutMix alpha (0 turns CutMix off).", limit=NON_NEGATIVE)
    accum_steps: int = setting("accum_steps", "Gradient accumulation: micro-batches per optimizer "
                                              "step.", limit=POSITIVE)
    grad_clip: float = setting("grad_clip", "Clip gradients to this global norm (0: no clipping).",
                                            limit=NON_NEGATIVE)
    amp: str = setting("amp", "Mixed precision: auto (fp16+GradScaler on CUDA, bf16 on CPUs with "
                              "AMX), fp16, bf16 or off.", choices=AMP_MODES)
    augment: str = setting("augment", "Augmentation policy: none, light or strong.",
                                      choices=POLICIES)
    hflip: bool = setting("hflip", "Add random horizontal flips (off: they change digits, letters "
                                   "and hand signs).")
    dihedral: bool = setting("dihedral", "Augment with random quarter turns and vertical flips "
                                         "(the 8 symmetries of the square, exact: no borders, no "
                                         "resampling) in place of the policy's small shifts, "
                                         "turns and scalings: for images without an up or "
                                         "down, such as microscopy, aerial or texture images "
                                         "(on by itself when the data has no up or down).")
    class_weight: str = setting("class_weight", "Class weights of the loss, against imbalance: "
                                                "none, sqrt (inverse square root of class "
                                                "frequency) or balanced (inverse frequency).",
                                                choices=BALANCING)
    sampler: str = setting("sampler", "Class-balanced sampling of training images, against "
                                      "imbalance: none (each image once per epoch), sqrt or "
                                      "balanced (drawn with those class weights).",
                                      choices=BALANCING)
    freeze_epochs: int = setting("freeze_epochs", "Epochs at the start that train only the "
                                                  "classifier, the backbone frozen (BatchNorm "
                                                  "statistics included), before full fine-tuning.",
                                                  limit=NON_NEGATIVE)
    layer_decay: float = setting("layer_decay", "Learning-rate scale per layer from the head down "
                                                "(timm's layer decay): below 1, earlier layers "
                                                "learn slower than the head; 1 turns it off.",
                                                limit=FRACTION)
    ema: float = setting("ema", "Decay of an exponential moving average of the weights, evaluated "
                                "and saved instead of the raw weights (e.g. 0.998; 0 turns it "
                                "off).", limit=UNIT)
    keep_last: int = setting("keep_last", "Also keep each of the last N epochs' weights as a "
                                          "checkpoint (epoch_<n>.pt) for snapshot ensembles and "
                                          "SWA-style soups (ensemble.build's last-epochs soup; 0 "
                                          "keeps none).", limit=NON_NEGATIVE, searchable=False)
    metric: str = setting("metric", "What picks a trial's best epoch and the search's best trial: "
                                    "val accuracy, or val macro-F1 (f1) for imbalanced classes.",
                                    choices=METRICS, searchable=False)
    loader_workers: int = setting("loader_workers", "Loader processes that build training "
                                                    "batches on the host ahead of the step "
                                                    "(0: automatic: none on CPUs, where OpenCV "
                                                    "augments in the training process; two when "
                                                    "batches stream to a GPU).",
                                                    limit=NON_NEGATIVE, searchable=False)
    prefetch: int = setting("prefetch", "Training batches each loader process builds ahead of "
                                        "the one training.", limit=NON_NEGATIVE, searchable=False)
    augment_device: str = setting("augment_device", "Where training images are augmented: auto "
                                                    "(where the model trains), cuda (whole "
                                                    "batches with tensor ops on the GPU) or cpu "
                                                    "(OpenCV on the host, image by image; a "
                                                    "worker without a GPU always augments so).",
                                                    choices=AUGMENT_DEVICES)
    device_data: str = setting("device_data", "On a GPU, where the decoded training images live: "
                                              "resident (in GPU memory: a batch is an index into "
                                              "them), stream (on the host, copied batch by "
                                              "batch) or auto (resident when they fit in half "
                                              "the free GPU memory, shared out among trials on "
                                              "one GPU). No effect on CPUs.",
                                              choices=DEVICE_DATA, searchable=False)
    channels_last: bool = setting("channels_last", "Train in channels_last memory layout on CUDA "
                                                   "(faster convolutions); no effect on CPU.",
                                                   searchable=False)
    pin_memory: bool = setting("pin_memory", "Build batches in page-locked memory and copy them to "
                                             "the GPU without blocking; no effect on CPU.",
                                             searchable=False)
    cudnn_benchmark: bool = setting("cudnn_benchmark", "Let cuDNN time its convolution algorithms "
                                                       "once and keep the fastest (not "
                                                       "bit-reproducible); no effect on CPU.",
                                                       searchable=False)
    torch_compile: bool = setting("torch_compile", "Compile the model with torch.compile: faster "
                                                   "steps after a compile of tens of seconds or "
                                                   "more in the first epoch.", searchable=False)
    seed: int = setting("seed", "Seed of the weights' training randomness (data order, "
                                "augmentation, dropout).", searchable=False, flag=False)
    threads: int = setting("threads", "CPU threads of one worker.", searchable=False, flag=False)
    gpu_share: float = setting("gpu_share", "Share of one GPU this run has (0.5: two trials share "
                                            "it).", searchable=False, flag=False)
    fit_by: float = setting("fit_by", "A deadline (UNIX time) for the training to end by: after "
                                      "each epoch the run sets its length to what fits, as "
                                      "measured, to the batch (at most fit_cap; longer when "
                                      "epochs speed up, shorter when they slow down; 0: train "
                                      "`epochs`).",
                            searchable=False, flag=False)
    fit_cap: int = setting("fit_cap", "The most epochs `fit_by` may stretch the run to (0: "
                                      "`epochs`).", searchable=False, flag=False)
    last_share: float = setting("last_share", "Share of the last epoch's batches the run trains: "
                                              "a run fitted to a deadline ends mid-epoch rather "
                                              "than up to an epoch early (1: all of them).",
                                limit=FRACTION, searchable=False, flag=False)
    plugins: tuple = setting("plugins", "Python module to import before models are built, e.g. "
                                        "one that registers a custom timm model (repeatable).",
                             searchable=False, cli_list=True, metavar="MODULE")

    def __post_init__(self) -> None:
        object.__setattr__(self, "plugins", tuple(self.plugins))  # YAML and JSON give lists

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config from a dict, ignoring keys that are not training settings."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def recipe(self) -> dict[str, Any]:
        """What the trained model depends on: every setting but where and how it ran (threads,
        loader processes, data placement: results do not depend on them), so two runs with
        equal recipes are the same run, e.g. for "is it finished?"."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME}

    @property
    def length(self) -> float:
        """The run's length in epochs, its last one's share included (10.6: 11 epochs, the last
        trained on 60 % of its batches)."""
        return self.epochs - 1 + self.last_share

    def made(self, saved: TrainConfig) -> bool:
        """Whether a run saved with config `saved` is a run of this config: the same recipe, or
        (when this config fits its epochs to a deadline) the same but for `saved`'s fitted
        length (epochs and last epoch's share), which may be anything up to this config's most."""
        want, got = self.recipe(), saved.recipe()
        if self.fit_by and got["epochs"] <= max(self.epochs, self.fit_cap):
            want["epochs"], want["last_share"] = got["epochs"], got["last_share"]
        return want == got


# settings of where and how a run trains, not of what it learns
RUNTIME = frozenset({"threads", "loader_workers", "prefetch", "pin_memory", "device_data",
                     "gpu_share", "fit_by", "fit_cap"})
SETTINGS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
SEARCHABLE = frozenset(n for n, f in SETTINGS.items() if f.metadata["searchable"])
OPTIONS = tuple(n for n, f in SETTINGS.items() if f.metadata["flag"])  # user-facing settings


def kind(name: str) -> type:
    """The Python type of a setting (bool, int, float or str)."""
    tp = SETTINGS[name].type
    return {"bool": bool, "int": int, "float": float, "str": str, "tuple": tuple}[tp] \
        if isinstance(tp, str) else tp


def check_value(name: str, value: Any, where: str) -> None:
    """Raises a UserError naming `where` when `value` is not allowed for setting `name`."""
    meta, tp = SETTINGS[name].metadata, kind(name)
    if meta["choices"] is not None:
        if value not in meta["choices"]:
            raise UserError(f"{where}: unknown {name} {value!r}; choose from "
                            f"{', '.join(meta['choices'])}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, not {value!r}")
        return
    if tp is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v
                                                           for v in value):
            raise UserError(f"{where} must be a list of module names, not {value!r}")
        return
    if tp is str:
        if not isinstance(value, str) or not value:
            raise UserError(f"{where} must be a non-empty text, not {value!r}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise UserError(f"{where} must be numeric, not {value!r}")
    limit = meta["limit"]
    if limit == POSITIVE and value <= 0:
        raise UserError(f"{where} must be positive, not {value}; use a value above 0")
    if tp is int and value != int(value):
        raise UserError(f"{where} must be a whole number, not {value}")
    if limit == UNIT and not 0 <= value < 1:
        raise UserError(f"{where} must be in [0, 1), not {value}")
    if limit == FRACTION and not 0 < value <= 1:
        raise UserError(f"{where} must be in (0, 1], not {value}")
    if value < 0:
        raise UserError(f"{where} must not be negative, not {value}")
