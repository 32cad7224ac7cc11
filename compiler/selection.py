"""The ``sparsify`` stage of ``spruce compile``, :func:`sparsify_student`: what to remove
from the trained weights. Channels by magnitude under the budget (a latency budget met as
measured on the target), handed to a named method that re-selects them during recovery
where the recipe asks for one; or, for ``unstructured`` / ``N:M``, the method's SparseModel
with its initial masks by magnitude (never random).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..api.budget import decode_timer
from ..api.prune import keep_top_channels
from ..api.transformers import hidden_width_rule
from ..passes.analysis import analyze
from ..passes.export import check_runs, remove_channels
from ..passes.importance import importance_scores, param_table
from ..passes.sparsity.count_rules import CountRule, fit_kept
from ..passes.sparsity.knapsack import build_cost_model, minimum_kept, normalise_importance, select_channels
from ..passes.sparsity.method import MethodConfig, RunLength
from ..passes.sparsity.model import SparseModel, sparsify_captured
from ..passes.sparsity.uniform import tie_problem, uniform_classes, untie
from ..runtime.budget import meet_latency_budget, smallest_selectable
from .activation_importance import ACTIVATION_CRITERION, activation_importance
from .channel_methods import drives_channels, sparsify_with_method
from .depth import block_remover, blocks_for_budget, blocks_to_remove
from .results import Captured, Profiled, Setup, Sparsified, Workspace

__all__ = ["CHANNEL_IMPORTANCE", "channel_analysis", "channels_by_magnitude", "check_budget_reachable",
           "sparsify_student"]

CHANNEL_IMPORTANCE = "l1"  # one-shot channel choice on a trained model: the weights' magnitude


def sparsify_student(setup: Setup, captured: Captured, profiled: Profiled, workspace: Workspace) -> Sparsified:
    """Choose what to remove from the trained weights: channels by magnitude under the budget
    (a latency budget met as measured), or the method's masks initialised by magnitude."""
    recipe = setup.recipe
    total_steps = setup.total_steps
    method = recipe.method.for_run(RunLength(total_steps, len(setup.data.train), recipe.structure))
    if recipe.structure == "channel":
        chosen = channels_by_magnitude(setup, captured, profiled, method, total_steps, workspace)
        if drives_channels(recipe.structure, setup.mode, recipe.method, recipe.method_named, recipe.budget):
            return _method_channels(setup, captured, profiled, chosen, workspace)
        return chosen
    trained = {id(p): p.detach().clone() for p in captured.graph.eval.parameters()}  # before any mask zeroes them
    sparse = sparsify_captured(captured.graph, method, structure=recipe.structure,
                               sparsity=recipe.sparsity if recipe.sparsity is not None else 0.0,
                               distribution=recipe.distribution, total_steps=total_steps)
    _magnitude_masks(sparse, trained, recipe.distribution)
    return Sparsified(method, sparse, total_steps)



def channel_analysis(setup: Setup, captured: Captured) -> Any:
    """The channel groups compile selects from: for a causal LM the hidden width too (the
    widths its RMSNorms normalise over, ``normalised_widths``), else the default analysis."""
    return analyze(captured.graph, normalised_widths=setup.is_lm)


def channels_by_magnitude(setup: Setup, captured: Captured, profiled: Profiled, method: MethodConfig, total_steps: int,
                     workspace: Workspace) -> Sparsified:
    """Channels kept by magnitude: under a latency budget, the measured closed loop; under a
    FLOPs/params budget, the knapsack; under a sparsity, the top fraction of each group.
    With ``uniform`` (default for transformers models), groups of one role keep one count in
    every layer (:mod:`spruce.passes.sparsity.uniform`), so the result writes back. A causal
    LM's groups include its hidden width, and whole decoder layers may go too
    (:mod:`spruce.compiler.depth`: the blocks the reachability check chose for a latency
    budget, else the recipe's ``depth``), removed from every timed selection. A transformers
    model's residual width keeps a count its config takes beside the kept heads
    (:func:`spruce.api.transformers.hidden_width_rule`: a stock ``LlamaConfig`` wants a
    multiple of ``num_attention_heads``), in every selection, timed or counted.

    Score source: for a causal LM, calibration activations (the recovery data's first batches,
    :func:`spruce.compiler.activation_importance.activation_importance`: each head's / MLP
    channel's input activations to ``o_proj`` / ``down_proj``, RMS over tokens, times the norm of
    the weight columns reading them; Minitron's activation importance weighed as Wanda weighs);
    for other models the trained weights' L1 magnitude (:data:`CHANNEL_IMPORTANCE`, over every
    member of a group). Never gradients: a student equal to its teacher has zero distillation
    gradient."""
    recipe = setup.recipe
    student, example = captured.student.eval(), setup.example
    analysis = channel_analysis(setup, captured)
    importance, required, scored_by = _channel_importance(setup, student, analysis, workspace)
    ties = uniform_classes(analysis.groups) if setup.uniform else None
    rule = hidden_width_rule(student, analysis.groups)
    blocks = profiled.blocks if profiled.blocks is not None else blocks_to_remove(setup, captured)
    then = block_remover(blocks)
    if blocks and drives_channels(recipe.structure, setup.mode, recipe.method, recipe.method_named, recipe.budget):
        raise ValueError(f"method {recipe.method.name} re-selects channels of the whole model: it cannot follow "
                         f"removed blocks ({', '.join(blocks)}); set depth 0 or leave the method out")
    selection = None
    if recipe.budget and "latency" in recipe.budget:
        workspace.say("choosing channels to meet the latency budget as measured on the target ...")
        steer = None if recipe.selection_cost == "latency" else build_cost_model(recipe.selection_cost, student,
                                                                                 analysis)
        selection = meet_latency_budget(analysis, student, profiled.table, setup.target, recipe.budget["latency"],
                                        importance, (example,), batch_size=recipe.budget_batch_size,
                                        round_to=recipe.round_to, required=required, cost_model=steer, ties=ties,
                                        reference_target=setup.dense_target, then=then, rule=rule)
        kept, compact = selection.kept, selection.compact
    elif recipe.budget and "decode" in recipe.budget:
        if not setup.is_lm:
            raise ValueError(f"a decode budget needs a causal language model (a transformers *ForCausalLM); "
                             f"{setup.model_name} is not one: use latency=F")
        workspace.say("choosing channels to meet the decode budget as measured (per token, key/value cache) ...")
        steer_kind = "params" if recipe.selection_cost == "latency" else recipe.selection_cost
        # no latency table times decoding: the knapsack steers by the selection cost (parameters
        # for a causal LM), the measured loop decides
        selection = meet_latency_budget(analysis, student, None, decode_timer(student), recipe.budget["decode"],
                                        importance, (example,), batch_size=1, round_to=recipe.round_to,
                                        required=required,
                                        cost_model=build_cost_model(steer_kind, student, analysis),
                                        ties=ties, then=then, rule=rule)
        kept, compact = selection.kept, selection.compact
    elif recipe.budget:
        ((kind, fraction),) = recipe.budget.items()
        cost = build_cost_model(kind, student, analysis)
        if ties is None:
            kept = dict(select_channels(cost, importance, fraction * cost.dense(), round_to=recipe.round_to,
                                        required=required).kept)
        else:
            tied_cost, tied_importance, tied_required = tie_problem(cost, importance, ties, required)
            chosen = select_channels(tied_cost, tied_importance, fraction * cost.dense(), round_to=recipe.round_to,
                                     required=tied_required)
            kept = dict(untie(chosen, importance, ties, sorted(cost.sizes)).kept)
        kept = _fit_kept(kept, analysis, rule, importance, required, recipe.round_to)
        compact = remove_channels(analysis, student, kept)
    else:
        kept = keep_top_channels(student, analysis.groups, recipe.sparsity or 0.0, CHANNEL_IMPORTANCE,
                            round_to=recipe.round_to, seed=recipe.seed)
        kept = _fit_kept(kept, analysis, rule, importance, required, recipe.round_to)
        compact = remove_channels(analysis, student, kept)
    if then is not None and selection is None:
        compact = then(compact)
    check_runs(compact, (example,), student, "compact model")
    norm = "" if recipe.importance_norm == "none" else f", divided by its group's mean ({recipe.importance_norm})"
    floor = f"; every group keeps at least {recipe.min_keep:g} of its channels" if required is not None else ""
    scored = f"{scored_by}{norm}" if setup.is_lm else f"{CHANNEL_IMPORTANCE} (weight magnitude{norm})"
    depth = (f"; blocks removed, least influential first (ShortGPT's block influence on calibration batches): "
             f"{', '.join(blocks)}") if blocks else ""
    return Sparsified(method, None, total_steps, compact, kept, selection, f"{scored}{floor}{depth}",
                      removed_blocks=tuple(blocks),
                      criterion=ACTIVATION_CRITERION if setup.is_lm else "weight magnitude")


def check_budget_reachable(setup: Setup, captured: Captured, workspace: Workspace) -> tuple[str, ...]:
    """Refuse a latency budget that no channel selection can reach, before a latency table is
    profiled: the smallest selectable model (every group at its fewest channels, ``min_keep``
    and ``round_to`` as the selection will apply them; a causal LM's hidden width among them) is
    timed against dense on the target (:func:`~spruce.runtime.budget.smallest_selectable`);
    raises ``InfeasibleBudget`` naming its measured latency when that misses the budget. Returns
    the whole blocks the selection removes too (:func:`spruce.compiler.depth.blocks_for_budget`:
    the recipe's ``depth``, or for a causal LM the fewest that make the budget reachable)."""
    recipe = setup.recipe
    workspace.say("checking the latency budget is reachable (timing the smallest selectable model) ...")
    student = captured.student.eval()
    analysis = channel_analysis(setup, captured)
    importance, required, _ = _channel_importance(setup, student, analysis)
    # the smallest selection as the selection's own cost model counts it (a causal LM's: parameters)
    steer = None if recipe.selection_cost == "latency" else build_cost_model(recipe.selection_cost, student, analysis)

    rule = hidden_width_rule(student, analysis.groups)

    def reach(then: Any) -> object:
        return smallest_selectable(analysis, student, setup.target, recipe.budget["latency"], importance,
                                   (setup.example,), batch_size=recipe.budget_batch_size, round_to=recipe.round_to,
                                   required=required, reference_target=setup.dense_target, then=then,
                                   cost_model=steer, rule=rule)

    return blocks_for_budget(setup, captured, reach)


def _fit_kept(kept: dict[int, np.ndarray], analysis: Any, rule: CountRule | None, importance: dict[int, np.ndarray],
              required: dict[int, np.ndarray] | None, round_to: int) -> dict[int, np.ndarray]:
    """``kept`` with ``rule``'s group (a transformers model's residual width) moved to a count
    its config takes (never below the channels ``required`` of it); as is without a rule."""
    if rule is None:
        return kept
    sizes = {g.id: g.size for g in analysis.groups if g.prunable}
    return fit_kept(kept, sizes, rule, importance, rule.least(required), round_to)


def _channel_importance(setup: Setup, student: torch.nn.Module, analysis: Any, workspace: Workspace | None = None
                        ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray] | None, str]:
    """Per prunable group, the channels' importance (normalised as the recipe says), the
    channels every selection keeps (``min_keep``; None when 0), and what scored them: for a
    causal LM its calibration activations, else the weights' magnitude. Raises ``ValueError``
    for a model with no prunable group."""
    recipe = setup.recipe
    if setup.is_lm:
        if workspace is not None:
            workspace.say("scoring heads and MLP channels from calibration activations ...")
        importance, scored_by = activation_importance(student, analysis.groups, setup.data.train, seed=recipe.seed)
    else:
        params = param_table(student)
        rng = np.random.default_rng(recipe.seed)
        importance = {g.id: importance_scores(CHANNEL_IMPORTANCE, g, params, rng) for g in analysis.groups
                      if g.prunable}
        scored_by = CHANNEL_IMPORTANCE
    if not importance:
        raise ValueError(f"{setup.model_name} has no prunable channel group; try structure unstructured or 2:4")
    importance = normalise_importance(importance, recipe.importance_norm)
    required = minimum_kept(importance, recipe.min_keep, recipe.round_to) if recipe.min_keep > 0 else None
    return importance, required, scored_by


@torch.no_grad()
def _magnitude_masks(sparse: SparseModel, trained: dict[int, torch.Tensor], distribution: str) -> None:
    """The initial masks of a trained model's SparseModel: the largest trained weights (per
    layer at its density, one global threshold for ``global``, N of each M for N:M), never
    random. The method's own initial masks already zeroed weights, so the trained weights
    are put back first."""
    ctx = sparse.context
    for layer in ctx.layers:
        layer.module.weight.copy_(trained[id(layer.module.weight)])
    if distribution == "global" and sparse.structure == "unstructured":
        for layer, mask in zip(ctx.layers, ctx.global_magnitude_masks(ctx.mean_density())):
            ctx.set_mask(layer, mask)
    else:
        for layer in ctx.layers:
            ctx.set_mask(layer, ctx.magnitude_mask(layer, layer.density))
    sparse.apply_masks()


def _method_channels(setup: Setup, captured: Captured, profiled: Profiled, chosen: Sparsified,
                     workspace: Workspace) -> Sparsified:
    """The one-shot selection ``chosen`` (its measured calibration, InfeasibleBudget already
    raised where due) handed over to the named method: the student becomes the method's
    channel SparseModel, which re-selects channels during recovery
    (:mod:`spruce.compiler.channel_methods`)."""
    recipe = setup.recipe
    workspace.say(f"method {recipe.method.name} re-selects channels under the budget during recovery ...")
    run = RunLength(chosen.total_steps, len(setup.data.train), recipe.structure)
    sparse, drive = sparsify_with_method(captured.graph, recipe.method, run, dict(recipe.budget), chosen.selection,
                                         profiled.table)
    return Sparsified(sparse.method.config, sparse, chosen.total_steps, selection=chosen.selection,
                      importance=f"{drive.criterion} (method {drive.method})", drive=drive)

