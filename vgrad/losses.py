"""Loss functions by name (the ``loss`` key) and the predictions they imply.

Each loss maps logits ``[batch, out_dim]`` and integer labels ``[batch]`` to one loss
per example; the training loss is their mean. All are computed from logits with
optax's numerically stable forms (Keras's ``from_logits`` path), never from
log(sigmoid(x)):

- ``bce``: one logit per example, sigmoid binary cross-entropy (labels 0/1).
- ``ce``: softmax cross-entropy over ``n_classes`` logits.
- ``mse``: mean over classes of (softmax(logits) - one_hot)^2, Keras's
  ``mean_squared_error`` on a softmax output as in the activations book chapter, where it
  learns slower than cross-entropy because the softmax's saturation enters its gradient.
- ``bce_onehot``: one sigmoid output per class and the binary cross-entropy of each
  against the one-hot target, summed over classes: the ``CrossEntropyCost`` of
  Nielsen's network2 (chapter 5), whose output error is a - y.
- ``regression``: squared error of one output against a real target (float labels: the
  adding problem). Its "accuracy" is the share of examples within ``TOLERANCE`` of the
  target, the adding problem's criterion of Hochreiter & Schmidhuber 1997.

A task with a label at every step (the copy task: logits ``[batch, T, out_dim]``, labels
``[batch, T]``) has one loss per step; an example's loss is their mean over steps (the
per-step cross-entropy of Arjovsky, Shah & Bengio 2016), and its correctness the share
of its steps predicted right. Everything downstream still sees one number per example.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def bce(logits: Array, labels: Array) -> Array:
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))


def ce(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def mse(logits: Array, labels: Array) -> Array:
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return jnp.mean((jax.nn.softmax(logits) - one_hot) ** 2, axis=-1)


def bce_onehot(logits: Array, labels: Array) -> Array:
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, one_hot).sum(axis=-1)


def regression(outputs: Array, targets: Array) -> Array:
    return (outputs[:, 0] - targets.astype(outputs.dtype)) ** 2


#: A regression output counts as correct within this distance of its target.
TOLERANCE = 0.04


def per_step(fn: Callable[[Array, Array], Array]) -> Callable[[Array, Array], Array]:
    """``fn`` of [batch, out_dim] logits and [batch] labels, taking [batch, T, out_dim]
    logits and [batch, T] labels too: the mean over the T steps, per example."""
    def over_steps(logits: Array, labels: Array) -> Array:
        if logits.ndim == 2:
            return fn(logits, labels)
        b, t = labels.shape
        return fn(logits.reshape(b * t, -1), labels.reshape(b * t)).reshape(b, t).mean(axis=1)

    return over_steps


LOSSES: dict[str, Callable[[Array, Array], Array]] = {
    name: per_step(fn) for name, fn in (("bce", bce), ("ce", ce), ("mse", mse),
                                        ("bce_onehot", bce_onehot),
                                        ("regression", regression))}


def out_dim(loss: str, n_classes: int) -> int:
    """Width of the output layer: one for ``bce`` and ``regression``, one per class
    otherwise."""
    return 1 if loss in ("bce", "regression") else n_classes


def correct(loss: str, logits: Array, labels: Array) -> Array:
    """1.0 where the prediction is right (a class, or a target within ``TOLERANCE``);
    per step (see the module docstring): the share of an example's steps that are."""
    return per_step(lambda z, y: _correct(loss, z, y))(logits, labels)


def _correct(loss: str, logits: Array, labels: Array) -> Array:
    if loss == "regression":
        return (jnp.abs(logits[:, 0] - labels) < TOLERANCE).astype(logits.dtype)
    return (predict(logits) == labels).astype(logits.dtype)


def predict(logits: Array) -> Array:
    """Predicted class: logit > 0 for a single-logit output, argmax otherwise."""
    if logits.shape[-1] == 1:
        return (logits[:, 0] > 0).astype(jnp.int32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
