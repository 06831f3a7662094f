"""Model soups: averaging the weights of models fine-tuned from one shared start.

One soup costs one model at inference, unlike a vote over M models. Averaging only makes sense
because every trial of a search starts from the same initial weights: models fine-tuned from
one start stay in one low-loss basin, while models trained apart from a random start do not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from models.vote import normalized_weights
from trainables.augment import normalize

State = dict[str, torch.Tensor]


def average_states(states: Sequence[State], weights: Sequence[float] | None = None) -> State:
    """Weighted mean of state dicts with identical keys and shapes.

    Floating tensors are averaged in float32 (float64 stays float64) and cast back, so fp16/bf16
    checkpoints do not lose precision while summing. Integer tensors such as BatchNorm's
    `num_batches_tracked` are counters, not weights: they are copied from the first state.

    Args:
        states: State dicts (e.g. `model.state_dict()`), on any device.
        weights: One non-negative weight per state, normalised to sum to 1; None is uniform.

    Returns:
        A new state dict on the first state's devices; the inputs are not modified.
    """
    if not states:
        raise ValueError("no states to average; pass at least one state dict")
    _check_same_layout(states)
    w = normalized_weights(weights, len(states)).tolist()
    out: State = {}
    for key, first in states[0].items():
        if not (torch.is_tensor(first) and torch.is_floating_point(first)):
            out[key] = first.detach().clone() if torch.is_tensor(first) else first
            continue
        acc_dtype = torch.promote_types(first.dtype, torch.float32)
        acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
        for weight, state in zip(w, states):
            if weight:
                acc.add_(state[key].detach().to(first.device, acc_dtype), alpha=weight)
        out[key] = acc.to(first.dtype)
    return out


def uniform_soup(states: Sequence[State]) -> State:
    """The uniform soup (Wortsman et al. 2022): every ingredient with the same weight."""
    return average_states(states)


def greedy_soup(states: Sequence[State], score_fn: Callable[[State], float], *,
                order: Sequence[int] | None = None) -> tuple[State, list[int]]:
    """Greedy soup (Wortsman et al. 2022): add ingredients best-first while the score holds.

    Starting from the best ingredient, each next one joins the uniform average of the chosen ones
    only if the validation score does not drop, so the soup never scores below its first
    ingredient. score_fn runs once per candidate soup (plus once per state when `order` is None);
    the current soup's score is kept, never recomputed.

    Args:
        states: The ingredients' state dicts (fine-tuned from one shared initial state).
        score_fn: Validation score of a state dict, higher is better (e.g. val accuracy).
        order: Member indices sorted best-first by individual validation score; None scores each
            state with score_fn (ties keep the lower index first). May be a subset of the members.

    Returns:
        The final soup and the indices of the chosen ingredients, in the order they joined.
    """
    if not states:
        raise ValueError("no states for a soup; pass at least one state dict")
    if order is None:
        scores = [float(score_fn(state)) for state in states]
        order = sorted(range(len(states)), key=lambda i: (-scores[i], i))
        best_score: float | None = scores[order[0]]
    else:
        order = [int(i) for i in order]
        if not order or len(set(order)) != len(order) or not all(
                0 <= i < len(states) for i in order):
            raise ValueError(f"order must list distinct member indices in [0, {len(states)}), "
                             f"got {order}")
        best_score = None
    chosen = [order[0]]
    soup = average_states([states[order[0]]])
    if best_score is None:
        best_score = float(score_fn(soup))
    for i in order[1:]:
        candidate = average_states([states[j] for j in chosen + [i]])
        score = float(score_fn(candidate))
        if score >= best_score:
            chosen.append(i)
            soup, best_score = candidate, score
    return soup, chosen


def _check_same_layout(states: Sequence[State]) -> None:
    """Raises a ValueError naming the first key whose presence or shape differs from state 0."""
    first = states[0]
    for i, state in enumerate(states[1:], start=1):
        for key in [*first, *(k for k in state if k not in first)]:
            if key not in state or key not in first:
                where = f"state {i}" if key not in state else "state 0"
                raise ValueError(f"cannot average state dicts: key {key!r} is missing from "
                                 f"{where}; soups need models of one architecture and head")
            a, b = first[key], state[key]
            if torch.is_tensor(a) and (not torch.is_tensor(b) or a.shape != b.shape):
                shape_b = tuple(b.shape) if torch.is_tensor(b) else type(b).__name__
                raise ValueError(f"cannot average state dicts: key {key!r} has shape "
                                 f"{tuple(a.shape)} in state 0 but {shape_b} in state {i}; "
                                 "soups need models of one architecture and head")


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model keeps BatchNorm running statistics, so a soup of it needs recalibration."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images_uint8_nhwc: np.ndarray, *, mean: Sequence[float],
                   std: Sequence[float], batch_size: int = 128) -> nn.Module:
    """Recomputes BatchNorm running statistics of a (souped) model on training images.

    Averaged weights with averaged BN statistics can be badly off for CNNs; one pass of
    `torch.optim.swa_utils.update_bn` over training data fixes them. Batches are made nearly equal
    in size because update_bn averages per batch, and a batch of one would break BatchNorm.

    Args:
        model: The model, modified in place; it stays on its device.
        images_uint8_nhwc: Training images, uint8 (N, H, W, 3), N >= 2.
        mean: Per-channel normalisation mean (3 floats, on the 0-1 scale), as in training.
        std: Per-channel normalisation std (3 floats).
        batch_size: Batch size to aim for; images are split into near-equal batches of 2 or more.

    Returns:
        The same model in eval mode; a model without BatchNorm is returned untouched.
    """
    if not has_batchnorm(model):
        return model
    images = np.asarray(images_uint8_nhwc)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise ValueError(f"BatchNorm recalibration needs at least 2 uint8 (N, H, W, 3) images, "
                         f"got {images.dtype} of shape {images.shape}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 for BatchNorm, got {batch_size}")
    device = next(iter(model.parameters()), next(iter(model.buffers()))).device
    n_batches = min(-(-len(images) // batch_size), len(images) // 2)  # each batch >= 2 images
    chunks = np.array_split(np.arange(len(images)), n_batches)

    def batches():
        for idx in chunks:
            x = torch.from_numpy(np.ascontiguousarray(images[idx])).permute(0, 3, 1, 2)
            yield normalize(x.to(device, non_blocking=True), mean, std)

    torch.optim.swa_utils.update_bn(batches(), model)
    return model.eval()
