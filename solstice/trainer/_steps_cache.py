"""`StepsCache`: the compiled steps a Trainer keeps between its runs.

Compiled functions depend on the experiment's structure (its non-array part), on whether
per-batch hooks need each step's metrics and on the in-step reductions. Runs of the same
structure share them, so a `test` after `fit` compiles nothing new.
"""

from collections.abc import Sequence

import equinox as eqx

from .._experiment import Experiment
from .._in_step import InStep
from ._compile import CompiledSteps
from ._placement import Placement
from ._precision import Policy
from ._sharding_rules import ShardingRule, TreeRule, experiment_shardings
from ._trace_log import TraceLog


class StepsCache:
    """The last compiled steps, and the trace log of their functions."""

    def __init__(
        self,
        placement: Placement,
        sharding_rules: Sequence[ShardingRule | TreeRule],
        policy: Policy,
    ):
        self.placement = placement
        self.sharding_rules = sharding_rules
        self.policy = policy
        self.trace_log = TraceLog()
        self.steps: CompiledSteps | None = None

    def get(
        self,
        experiment: Experiment,
        keep: bool,
        in_steps: dict[str, InStep] | None,
        *,
        new_structure: bool = False,
    ) -> CompiledSteps:
        """The compiled steps for `experiment`: the last ones if they fit, else new ones.
        `in_steps`: the training steps' in-step reductions (`None`: an evaluation, which
        runs none, so any will do). `new_structure`: a hook changed the structure mid-run (the same trace log goes on,
        its next traces not counted as retraces)."""
        steps = self.steps
        static = eqx.filter(experiment, eqx.is_array, inverse=True)
        if (
            steps is not None
            and steps.keep_step_metrics == keep
            and (in_steps is None or steps.in_steps.keys() == in_steps.keys())
            and eqx.tree_equal(static, steps.static)
        ):
            return steps
        if new_structure:
            self.trace_log.new_generation()
        else:
            self.trace_log = TraceLog()
        shardings = None
        if self.sharding_rules:
            dyn = eqx.filter(experiment, eqx.is_array)
            shardings = experiment_shardings(dyn, self.placement.mesh, self.sharding_rules)
        self.steps = CompiledSteps(
            experiment,
            self.placement.replicated,
            self.trace_log,
            keep_step_metrics=keep,
            dyn_shardings=shardings,
            in_steps=in_steps or {},
            policy=self.policy,
        )
        return self.steps
