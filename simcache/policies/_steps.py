"""Workload-derived fields for rules that count time in steps or read gate weights: each is a
state field whose ``init`` reads the prepared :class:`~simcache.workload.Workload`
(``Sizes.inputs["workload"]``), so what a rule needs from the workload is declared once, here."""

import numpy as np

from simcache.policies.registry import Field


def step_of_access(work) -> np.ndarray:
    """The step of every access (group g = step * L + layer)."""
    d = work.demand
    groups = np.repeat(np.arange(d.group_ptr.shape[0] - 1), np.diff(d.group_ptr))
    return groups // d.num_layers


def gate_of_access(work) -> np.ndarray:
    """Every access's router probability, averaged over the step's tokens: the gate weights
    the trace recorded for that (step, layer, expert), summed in token order and divided by
    the step's token count (a token that did not choose the expert adds 0). A trace without
    weights counts 1/k per choice."""
    t, steps, d = work.trace, work.steps, work.demand
    L, E, k = t.num_layers, t.num_experts, t.top_k
    experts = t.token_experts()
    weights = (np.full(experts.shape, 1.0 / k) if t.weights is None
               else t.weights.reshape(experts.shape).astype(np.float64))
    n = np.diff(steps.step_ptr)
    step = np.repeat(np.arange(steps.num_steps), n)  # of each processed token
    tok = steps.step_tokens
    # access index of every (token, layer, rank): accesses sort by (group, key)
    code = (step[:, None, None] * L + np.arange(L)[None, :, None]) * (L * E) + (
        np.arange(L)[None, :, None] * E + experts[tok])
    groups = np.repeat(np.arange(d.group_ptr.shape[0] - 1), np.diff(d.group_ptr))
    chosen = (experts[tok] >= 0).ravel()  # -1: no expert recorded (a gap in the trace)
    at = np.searchsorted(groups * (L * E) + d.keys, code.ravel()[chosen])
    gate = np.zeros(d.num_accesses)
    np.add.at(gate, at, weights[tok].ravel()[chosen])  # in token order, as the twin adds them
    return gate / n[groups // L]


STEP_STATE = {
    "step_of": Field(lambda z: z.accesses, np.int64, doc="step of each access",
                     init=lambda z: step_of_access(z.inputs["workload"])),
}
GATE_STATE = {
    "gate": Field(lambda z: z.accesses, np.float64, doc="mean router probability of each access's expert over the step's tokens",
                  init=lambda z: gate_of_access(z.inputs["workload"])),
}
LAYERS_STATE = {
    "n_layers": Field(lambda z: 1, np.int64, doc="layers of the model", init=lambda z: np.array([z.layers])),
}
