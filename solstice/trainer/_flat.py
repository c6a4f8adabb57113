"""`FlatTree`: a pytree held as its flat list of leaves, rebuilt only when someone asks.

Compiled steps take and return the experiment's arrays and the metric accumulators every
step. Passed as Equinox modules, JAX flattens and rebuilds them in Python on every call (about
half the host time of a small step); passed as lists of arrays, it does not. The tree view is
for everything outside the hot loop (callbacks, checkpoints).
"""

from typing import Any

import jax
from jaxtyping import PyTree


class FlatTree:
    """Holds `leaves` (a list of arrays) and the `treedef` to rebuild the tree from them.

    **Example:**

    ```python
    state = FlatTree(dyn)
    for _ in range(steps):
        state.leaves = step(state.leaves, ...)   # no pytree work per call
    dyn = state.tree                             # rebuilt once, cached until leaves change
    ```
    """

    __slots__ = ("_leaves", "_tree", "treedef")

    def __init__(self, tree: PyTree = None):
        self._tree: PyTree = None
        self._leaves: list[Any] | None = None
        self.treedef: Any = None
        self.tree = tree

    @property
    def tree(self) -> PyTree:
        if self._tree is None and self.treedef is not None:
            self._tree = jax.tree.unflatten(self.treedef, self._leaves or [])
        return self._tree

    @tree.setter
    def tree(self, tree: PyTree) -> None:
        self._tree = tree
        if tree is None:
            self._leaves, self.treedef = None, None
        else:
            self._leaves, self.treedef = jax.tree.flatten(tree)

    @property
    def leaves(self) -> Any:
        """The leaves (`None` for no tree)."""
        return self._leaves

    @leaves.setter
    def leaves(self, leaves: list) -> None:
        """New leaves of the same structure (the tree view is rebuilt on the next read)."""
        self._leaves = leaves
        self._tree = None
