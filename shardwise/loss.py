"""How a model's output becomes the loss the engine trains on.

A batch is ``(inputs, targets)``, and the loss is ``loss_fn(output, targets)``: a caller's
`loss_fn` gets the output as the model returned it; the default reads the logits (the output
itself, or its ``.logits``: a Hugging Face ModelOutput) and takes the token cross-entropy;
under a tensor-parallel plan that splits the logits, the plan's loss reads the split logits.
Or a batch is a dict of the model's keyword inputs, with ``labels``: the model computes its
own loss (``output.loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from shardwise.errors import ConfigError, TrainingError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def logits_of(output: object) -> torch.Tensor:
    """A model's logits: the output itself, or its ``logits`` (Hugging Face ModelOutput)."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if logits is None:
        raise TrainingError(
            f"the model returned a {type(output).__name__}, neither logits nor an object with "
            "`.logits`; pass loss_fn= to initialize() (it gets the output as returned) or "
            "train on dict batches with labels"
        )
    return logits


def choose_loss(given: LossFn | None, tp_loss: LossFn | None) -> LossFn:
    """The loss on (output, targets): a tensor-parallel plan's own on the (split) logits,
    else `given`, else token cross-entropy of the logits."""
    if tp_loss is None:
        return given or (lambda output, targets: cross_entropy_loss(logits_of(output), targets))
    if given is not None:
        raise ConfigError(
            "a custom loss_fn cannot read the model's output under this tensor-parallel plan: "
            "it splits the logits and brings its own loss (or train on dict batches with "
            "labels, where the model computes its loss)"
        )
    return lambda output, targets: tp_loss(logits_of(output), targets)


def own_loss(output: object) -> torch.Tensor:
    """The loss a model computed itself (a dict batch with ``labels``)."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None:
        raise TrainingError(
            f"a dict batch trains on the model's own loss, but its {type(output).__name__} "
            "output has no `loss`: include labels in the batch, or pass (inputs, targets)"
        )
    return loss
