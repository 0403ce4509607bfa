"""vgrad: measure vanishing and exploding gradients layer by layer.

``python -m vgrad.train`` trains a Flax MLP with a jit-compiled optax step that returns
its gradient pytree every step, reduces it to per-layer statistics inside the compiled
program, and writes a self-describing run folder. See the README for the output contract.
"""

__version__ = "0.1.0"
