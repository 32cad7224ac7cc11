"""The first stage of ``spruce compile``, :func:`load_setup`: the recipe made concrete
(target, model and example, data, the user's functions, the output plan), every check that
can fail on the user's input run before any training or profiling; and the held-out
evaluations later stages share (:func:`held_out_accuracy`, :func:`user_metrics`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..capture.transformers import cache_configs, is_transformers_model
from ..passes.graph import require_data
from ..targets.base import get_target
from .datasets import DataError, Loaders, check_disjoint, default_model, inputs_of, load_data, loaders_from
from .floors import check_floor_names
from .kinds import OutputDeclaration
from .lm import causal_lm_reason, recovery_tokens
from .outputs import OutputPlan, batch_dims, flatten_outputs, guess_ctc_blanks, plan_outputs
from .precision import calibration_inputs
from .recipes import Recipe
from .results import Given, Setup, UserFunction, Workspace
from .specs import model_spec_kind

__all__ = ["LM_ROUND_TO", "held_out_accuracy", "load_setup", "user_metrics"]

LM_ROUND_TO = 1  # a causal LM's default round_to: its head groups count whole heads (a few per group)
# A causal LM's default selection_cost: parameter counts steer the measured budget loop (the budget is
# still judged on measured prefill latency); profiling a per-layer latency table over every head count
# and MLP width of every layer costs more than the loop's few measured attempts, and the MAC count does
# not see the linear calls of a torch.export graph.
LM_SELECTION_COST = "params"
TEXT_BATCH_SIZE = 8  # windows per batch of text:PATH data unless the recipe sets batch_size (see _batch_size)


def load_setup(recipe: Recipe, workspace: Workspace, given: Given) -> Setup:
    """Target, model and example, data, the user's functions and the output plan; every
    check that can fail on the user's input runs here, before any training or profiling."""
    target = get_target(recipe.target, **recipe.target_settings())
    target.require()  # a target that cannot run here is a user error now, not after training
    int8 = recipe.shipped_precision == "int8"
    reference_target = get_target(recipe.target, **recipe.target_settings("fp32")) if int8 else target
    selection_target = target if recipe.table_precision == recipe.shipped_precision else \
        reference_target if recipe.table_precision == "fp32" and int8 else \
        get_target(recipe.target, **recipe.target_settings(recipe.table_precision))
    prepare = UserFunction.of(given.prepare if given.prepare is not None else recipe.prepare, "prepare")
    model, example, data, name, is_default = _model_example_data(recipe, given, prepare)
    loss = UserFunction.of(given.loss_fn if given.loss_fn is not None else recipe.loss, "loss_fn")
    evaluate_fn = UserFunction.of(given.evaluate if given.evaluate is not None else recipe.evaluate, "evaluate")
    lm_reason = causal_lm_reason(model)
    if lm_reason is not None:
        example = _lm_example(recipe, data, example, name)
        _without_cache(model)
        if "round_to" not in recipe.model_fields_set:  # a head group's channels are whole heads
            recipe = recipe.with_overrides(round_to=LM_ROUND_TO)
        if "selection_cost" not in recipe.model_fields_set:  # no per-layer latency table: see LM_SELECTION_COST
            recipe = recipe.with_overrides(selection_cost=LM_SELECTION_COST)
    with torch.no_grad():
        try:
            outputs = model.eval()(example)
        except Exception as exc:
            raise ValueError(f"{name} does not run on the example input of shape {tuple(example.shape)}: "
                             f"{type(exc).__name__}: {exc}") from None
    recognised = None
    if lm_reason is not None and "logits" in getattr(outputs, "keys", lambda: ())():
        pad = data.text.pad_token_id if getattr(data, "text", None) is not None else \
            getattr(model.config, "pad_token_id", None)
        recognised = {"output['logits']": (OutputDeclaration(kind="lm", pad=pad), lm_reason)}
    plan = plan_outputs(outputs, recipe.distill_losses, name, recipe.outputs, batch_dims(model, example, outputs),
                        recognised)
    plan = guess_ctc_blanks(plan, model, (inputs_of(batch) for batch in data.train))
    check_disjoint(data, recipe.data)
    mode = _recovery_mode(recipe, data, plan, loss, name)
    if loss is not None and mode == "loss":
        _check_loss(loss, model, data)
    metric_names = list(_check_evaluate(evaluate_fn, model, data)) if evaluate_fn is not None else None
    check_floor_names(recipe.floor, plan, metric_names)
    calibration = tuple(calibration_inputs(data.train, name=f"{recipe.data}'s recovery set", example=example)) \
        if int8 else ()
    workspace.say(f"spruce compile: {name} on {data.name}, target {recipe.target}, structure {recipe.structure}, "
                  + (f"budget {recipe.budget}" if recipe.budget else f"sparsity {recipe.sparsity}")
                  + f", recover {mode}" + (", precision int8" if int8 else "")
                  + (f", latency table at {recipe.table_precision}" if selection_target is not target else ""))
    for warning in plan.warnings():
        workspace.say(f"warning: {warning}")
    folder = recipe.model if recipe.model is not None and model_spec_kind(recipe.model) == "folder" else None
    tokens, tokens_from = recovery_tokens(recipe.recover_tokens, folder) if lm_reason else (None, "")
    uniform = recipe.uniform if recipe.uniform is not None else is_transformers_model(model)
    return Setup(recipe, target, data, model, example, copy.deepcopy(model.state_dict()), plan, mode, loss,
                 evaluate_fn, name, is_default, model_folder=folder, uniform=uniform, recover_tokens=tokens,
                 recover_tokens_from=tokens_from, reference_target=reference_target, calibration=calibration,
                 selection_target=selection_target)


def _lm_example(recipe: Recipe, data: Loaders, example: torch.Tensor, name: str) -> torch.Tensor:
    """A causal LM's example: the data's first sequence (1, L) when the data are token ids,
    else the model's own; cut to ``seq_len`` when given."""
    if data.example.dtype == torch.long and data.example.ndim == 2:
        example = data.example[:1]
    if recipe.seq_len is not None:
        if recipe.seq_len > example.shape[1]:
            raise ValueError(f"seq_len {recipe.seq_len}: the data's sequences of {name} hold {example.shape[1]} tokens")
        example = example[:, :recipe.seq_len]
    return example


def _at_length(example: torch.Tensor, length: int) -> torch.Tensor:
    """Token ids (1, L) cut or cyclically repeated to (1, ``length``)."""
    return example.repeat(1, -(-length // example.shape[1]))[:, :length]


def _without_cache(model: nn.Module) -> None:
    """A causal LM computes every position in compile (no key/value cache in its outputs);
    ``spruce.compile`` gives a live model its settings back when it ends (``cache_settings_kept``)."""
    for config in cache_configs(model):
        config.use_cache = False



def _single_input(inputs: Any, where: str) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, (tuple, list)) and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
        return inputs[0]
    if isinstance(inputs, dict) and list(inputs) == ["input_ids"] and isinstance(inputs["input_ids"], torch.Tensor):
        return inputs["input_ids"]  # a transformers folder's keyword example: its first positional input
    raise ValueError(f"{where}: compile takes models with one input tensor; the example inputs are "
                     f"{type(inputs).__name__} of {len(inputs) if isinstance(inputs, (tuple, list)) else 1}")


def _model_example_data(recipe: Recipe, given: Given, prepare: UserFunction | None
                        ) -> tuple[nn.Module, torch.Tensor, Loaders, str, bool]:
    """The model, its example input (batch 1), the data, a name for messages, and whether it
    is the embedded default (trained by ``dense_reference``)."""
    if given.model is None and recipe.model is None:
        data = _data(recipe, given, None, prepare)
        if recipe.input_shape is not None:
            raise ValueError("input_shape: the embedded default takes the data's input shape")
        return default_model(data, recipe.seed), data.example, data, "the embedded digits CNN", True
    if given.model is not None:
        if given.example is None:
            raise ValueError("compile(model, example_inputs): a live model needs its example inputs")
        model, example, name = given.model, _single_input(given.example, "example_inputs"), type(given.model).__name__
    else:
        from .models import resolve_model

        torch.manual_seed(recipe.seed)
        model, inputs = resolve_model(recipe.model, [tuple(recipe.input_shape)] if recipe.input_shape else None)
        example, name = _single_input(inputs, f"model {recipe.model}"), f"model {recipe.model}"
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} is a {type(model).__name__}, not a torch.nn.Module")
    require_data(model, (example,), f"compile {name}")  # a meta-device model is refused by name
    example = example[:1]
    if causal_lm_reason(model) is not None and recipe.seq_len is not None:  # text data: windows of seq_len
        example = _at_length(example, recipe.seq_len)
    data = _data(recipe, given, example, prepare, model)
    return model, example, data, name, False


def _data(recipe: Recipe, given: Given, example: torch.Tensor | None, prepare: UserFunction | None,
          model: nn.Module | None = None) -> Loaders:
    text = _text_options(model)
    if isinstance(given.data, Loaders):
        return given.data
    if given.data is not None:
        if isinstance(given.data, str):
            return load_data(given.data, recipe.seed, _batch_size(recipe, given.data, True), example,
                             prepare.function if prepare is not None else None, recipe.augment, **text)
        if not (isinstance(given.data, tuple) and len(given.data) == 2):
            raise DataError("data must be a spec string, Loaders, or a (recovery_loader, held_out_loader) tuple")
        return loaders_from(given.data[0], given.data[1], "data", "the given loaders")
    return load_data(recipe.data, recipe.seed, _batch_size(recipe, recipe.data, example is not None), example,
                     prepare.function if prepare is not None else None, recipe.augment, **text)


def _batch_size(recipe: Recipe, spec: str, sized: bool) -> int:
    """The loaders' batch size: the recipe's, at most 8 for ``images:DIR`` resized to a model's
    example (``sized``); for ``text:PATH`` :data:`TEXT_BATCH_SIZE` unless the recipe sets one (a
    token budget of 10 % of a small model's training tokens is a few dozen steps at 8 windows, a
    handful at 64)."""
    if spec.startswith("images:") and sized:
        return min(recipe.batch_size, 8)
    if spec.startswith("text:") and "batch_size" not in recipe.model_fields_set:
        return TEXT_BATCH_SIZE
    return recipe.batch_size


def _text_options(model: nn.Module | None) -> dict[str, Any]:
    """For ``text:PATH`` data: a causal LM's tokenizer (the folder it was loaded from) and its
    embedding rows; nothing for other models."""
    if model is None or causal_lm_reason(model) is None:
        return {}
    folder = getattr(model, "name_or_path", None)  # the folder from_pretrained read (transformers sets it)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return {"tokenizer": folder or None,
            "embedding_rows": getattr(embeddings, "num_embeddings", None)}


def _recovery_mode(recipe: Recipe, data: Loaders, plan: OutputPlan, loss: UserFunction | None, name: str) -> str:
    labels_usable = data.labeled and plan.all_scores and len(plan.outputs) == 1 and data.num_classes > 0
    lm_loss_built_in = any(spec.kind == "lm" for spec in plan.outputs)  # the next token is the label
    if recipe.recover == "loss" or (recipe.recover is None and data.labeled and loss is None):
        if loss is None and not labels_usable and not lm_loss_built_in:
            non_scores = [s.name for s in plan.outputs if s.kind != "scores"] or [s.name for s in plan.outputs]
            raise ValueError(
                f"{name}: the data carries labels but no loss_fn was given, and output(s) "
                f"{', '.join(non_scores)} are not class scores, so the built-in cross-entropy does not apply; "
                "give loss=FILE.py:loss_fn (loss_fn(outputs, batch)), or recover=distill to ignore the labels")
        return "loss"
    if recipe.recover is None:
        return "loss" if loss is not None else "distill"
    return recipe.recover


def _check_loss(loss: UserFunction, model: nn.Module, data: Loaders) -> None:
    """Call the loss once on the dense model's outputs for the first recovery batch."""
    batch = next(iter(data.train))
    try:
        value = loss.function(model.eval()(inputs_of(batch)), batch)
    except Exception as exc:
        raise ValueError(f"loss_fn {loss.where} raised {type(exc).__name__}: {exc} (called as "
                         "loss_fn(outputs, batch) on the first recovery batch)") from None
    if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
        raise ValueError(f"loss_fn {loss.where} must return a scalar float tensor, got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
    if not value.requires_grad:
        raise ValueError(f"loss_fn {loss.where} returned a tensor that does not depend on the outputs "
                         "(no gradient would reach the model)")


def _check_evaluate(evaluate_fn: UserFunction, model: nn.Module, data: Loaders) -> dict[str, float]:
    """Call ``evaluate`` once on the dense model with the first held-out batch."""
    try:
        with torch.no_grad():
            value = evaluate_fn.function(model.eval(), [next(iter(data.test))])
    except Exception as exc:
        raise ValueError(f"evaluate {evaluate_fn.where} raised {type(exc).__name__}: {exc} (called as "
                         "evaluate(model, loader) on the first held-out batch)") from None
    return _metrics(value, evaluate_fn)


def _metrics(value: Any, evaluate_fn: UserFunction) -> dict[str, float]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"evaluate {evaluate_fn.where} must return {{name: number}}, got {type(value).__name__}")
    try:
        return {k: float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ValueError(f"evaluate {evaluate_fn.where} must return {{name: number}}, got {value!r}") from None


def user_metrics(setup: Setup, model: nn.Module) -> dict[str, float]:
    """The user's ``evaluate(model, held_out_loader)`` metrics ({} without ``evaluate``), in eval mode."""
    if setup.evaluate is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _metrics(setup.evaluate.function(model, setup.data.test), setup.evaluate)
    finally:
        model.train(was_training)


@torch.no_grad()
def held_out_accuracy(setup: Setup, model: nn.Module) -> float | None:
    """Top-1 accuracy on the held-out data where labels exist and the output is class scores."""
    data = setup.data
    if not (data.labeled and setup.plan is not None and setup.plan.all_scores and len(setup.plan.outputs) == 1):
        return None
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in data.test:
        inputs, labels = batch
        predicted = flatten_outputs(model(inputs))[0][1].argmax(dim=1)
        correct += int((predicted == labels).sum())
        total += int(labels.numel())
    model.train(was_training)
    return correct / max(total, 1)

