"""timm model factory: dropout, optional local pretrained weights, one shared initial state."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from trainables.errors import UserError


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Imports user modules (e.g. ones registering custom timm models) in this process."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"cannot import plugin module {name!r} ({exc}); put it on "
                            "PYTHONPATH or install it") from None


def check_model_name(name: str) -> None:
    """Raises a UserError naming close matches when timm has no model called `name`."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"timm has no model named {name!r}{hint}; pick one from timm.list_models()")


def create_model(name: str, num_classes: int, *, drop_rate: float = 0.0,
                 pretrained: bool = False, pretrained_file: str | None = None) -> nn.Module:
    """Builds a timm model with a fresh `num_classes` head.

    Args:
        name: timm model name.
        num_classes: Output classes; a pretrained head of another size is dropped.
        drop_rate: Dropout before the classifier.
        pretrained: Load timm's pretrained weights (needs a network unless `pretrained_file`).
        pretrained_file: Local weights file (.pth/.bin/.safetensors) to start from instead.
    """
    import timm

    check_model_name(name)
    kwargs: dict = {"num_classes": num_classes, "drop_rate": drop_rate}
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise UserError(f"pretrained weights file {path} does not exist; pass an existing "
                            "--pretrained-file or leave it out to start from random weights")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path.resolve())})
    elif pretrained:
        kwargs["pretrained"] = True
    try:
        model = timm.create_model(name, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        if not kwargs.get("pretrained"):
            raise
        where = pretrained_file or "the model hub"
        raise UserError(f"cannot load pretrained weights for {name} from {where} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); pass "
                        "--pretrained-file with a local weights file for this model") from None
    if pretrained_file:
        _check_weights_cover(model, Path(pretrained_file).expanduser(), name)
    return model


def _check_weights_cover(model: nn.Module, path: Path, name: str) -> None:
    """timm loads a file loosely when the head changes; refuse one that matches the body poorly.

    Otherwise a file for the wrong thing (a training checkpoint, another model) would leave the
    model at random weights with only a warning.
    """
    from timm.models import load_state_dict

    try:
        saved = load_state_dict(str(path))
    except Exception as exc:  # any unreadable file: pickle, safetensors or zip errors
        raise UserError(f"cannot read weights file {path} ({type(exc).__name__}); pass a "
                        "state dict saved with torch.save or safetensors") from None
    own = model.state_dict()
    matched = sum(1 for k, v in saved.items()
                  if k in own and getattr(v, "shape", None) == own[k].shape)
    if matched < 0.5 * len(own):
        raise UserError(f"weights file {path} matches only {matched} of {len(own)} tensors of "
                        f"{name}; pass a state dict saved from this architecture")


def initial_state(name: str, num_classes: int, *, seed: int, pretrained: bool = False,
                  pretrained_file: str | None = None) -> dict[str, torch.Tensor]:
    """The starting weights every trial of a search shares (seeded head / random init).

    Weight averaging (model soups) only makes sense between models fine-tuned from one start, so
    trials load this state instead of initialising on their own.
    """
    torch.manual_seed(seed)
    model = create_model(name, num_classes, pretrained=pretrained, pretrained_file=pretrained_file)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def state_id(state: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict: models whose checkpoints carry the same `init_id`
    were fine-tuned from the same weights, so their weights can be averaged."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()
                 .tobytes())
    return h.hexdigest()[:12]


def normalization(model: nn.Module) -> tuple[list[float], list[float]]:
    """Mean and std the model's weights expect (timm's data config travels with the weights)."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return list(cfg["mean"]), list(cfg["std"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under a DistributedDataParallel wrapper."""
    return model.module if hasattr(model, "module") else model
