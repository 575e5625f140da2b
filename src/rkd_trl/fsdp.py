"""FSDP2: shard the teacher like the student, and gather a model's parameters once around work done outside its root
forward (a whole rollout, the loss's output heads).

Under FSDP2 every call of a sharded module all-gathers its parameters and frees them after. The teacher-mixed sampler
calls both models once per token and each process stops when its own completions have ended, so gathering per call
would make processes issue different numbers of collectives and wait for each other forever. `gathered` all-gathers
the parameters of the given FSDP modules once (`FSDPModule.unshard`), keeps them through any number of forwards
(resharding after forward turned off meanwhile) and frees them at the end (`FSDPModule.reshard`): in between, the
models make no collective call at all.
"""

import copy
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from accelerate.utils import fsdp2_prepare_model

from .scoring import OutputHead, final_hidden_states

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch < 2.6, where accelerate does not offer FSDP2 either
    FSDPModule = None


def fsdp_modules(model: torch.nn.Module) -> list:
    """The FSDP2 modules in `model` (the root included), outermost first; empty for a model FSDP2 does not shard."""
    if FSDPModule is None:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def modules_holding(model: torch.nn.Module, parameters: Iterable[torch.Tensor]) -> list:
    """The FSDP2 modules whose parameter groups hold `parameters` (the innermost FSDP module around each parameter):
    unsharding them makes those parameters whole."""
    wanted = {id(parameter) for parameter in parameters}
    sharded = set(fsdp_modules(model))
    module_names = {name: module for name, module in model.named_modules() if module in sharded}
    holders = []
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) not in wanted:
            continue
        owner = name.rpartition(".")[0]
        while owner not in module_names and owner:
            owner = owner.rpartition(".")[0]
        holder = module_names.get(owner)
        if holder is not None and holder not in holders:
            holders.append(holder)
    return holders


@contextmanager
def gathered(modules: list, reshard: bool = True):
    """Within the block the parameters of the FSDP2 `modules` are whole on every process, whatever runs meanwhile.

    Entering all-gathers each module's parameters once and turns its resharding after forward off, so forwards in the
    block make no collective call; leaving restores the setting and, with `reshard`, frees the gathered parameters
    again. `reshard=False` leaves them to FSDP, which frees them after the backward that reduces their gradients
    (for parameters used by a loss computed in the block). Every process must enter and leave the block together.
    """
    settings = [_reshard_after_forward_setting(module) for module in modules]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        # One unit at a time: an all-gather lands in a flat buffer that is copied out into the parameters, so
        # waiting on each before the next keeps a single such buffer alive.
        module.unshard()
    try:
        yield
    finally:
        for module, setting in zip(modules, settings, strict=True):
            if reshard:
                module.reshard()
            _restore_reshard_after_forward_setting(module, setting)


def forget_forwards(model: torch.nn.Module) -> None:
    """Clear the per-iteration records FSDP2 keeps of a sharded model's forwards (the order of module calls, used to
    prefetch in the backward). A backward clears them; the teacher never runs one, so without this they would grow by
    one entry per FSDP module and decoded token for the whole run; the student's rollout forwards, whose number
    differs between processes, would steer its next backward's prefetching. Also reshards every module of the
    model."""
    modules = fsdp_modules(model)
    if modules:
        modules[0].reset_iter_state()  # on the root, the outermost FSDP module


def unshard_before_backward(hidden: torch.Tensor, modules: list) -> None:
    """All-gather `modules` again, if FSDP has freed them, when the backward reaches `hidden` (final hidden states
    that a loss projected with the output head outside the root forward).

    FSDP re-gathers a module group before the backward through it with a hook on the group's forward output. The
    output layer's group also holds the backbone's final norm (accelerate groups them), and its output is the root
    forward's logits, which the loss does not use: that hook never fires. With two losses on two forwards (the LM
    loss), the first backward through the norm frees the group and the second would read freed parameters. The call
    is a no-op while the parameters are whole; every process runs the same graph, so all make the same calls.
    """

    def unshard(grad):
        for module in modules:
            module.unshard()
        return grad

    if hidden.requires_grad:
        hidden.register_hook(unshard)


def _reshard_after_forward_setting(module):
    # FSDP2 has a public setter for `reshard_after_forward` but no getter. Its value lives in each parameter group's
    # post-forward mesh (None: keep the parameters after forward) and, for the root's automatic choice made at its
    # first forward, in the state's flag; both are read here and put back as they were, integers and automatic
    # choice included.
    state = module._get_fsdp_state()
    return state._auto_reshard_after_forward, [group.post_forward_mesh_info for group in state._fsdp_param_groups]


def _restore_reshard_after_forward_setting(module, setting) -> None:
    state = module._get_fsdp_state()
    state._auto_reshard_after_forward, meshes = setting
    for group, mesh in zip(state._fsdp_param_groups, meshes, strict=True):
        group.post_forward_mesh_info = mesh


def shard_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard the frozen teacher with accelerate's FSDP2 preparation and the run's FSDP plugin settings (wrap policy,
    mixed precision, offloading, mesh), as the student is sharded, but with no optimizer; every FSDP module of the
    teacher reshards after forward, so its parameters are sharded between uses.

    `fsdp2_prepare_model` fixes the plugin's layer classes to the first model it wraps; the teacher is wrapped with a
    copy of the plugin, so that the student, prepared later by the trainer, gets its own layer classes.
    """
    teacher.requires_grad_(False)  # before sharding: FSDP2 then keeps the teacher's dtype (no float32 master copy)
    plugin = accelerator.state.fsdp_plugin
    accelerator.state.fsdp_plugin = copy.copy(plugin)
    try:
        teacher = fsdp2_prepare_model(accelerator, teacher)
    finally:
        accelerator.state.fsdp_plugin = plugin
    teacher.set_reshard_after_forward(True)
    _check_fsdp2_internals(teacher)
    return teacher.eval()


def _check_fsdp2_internals(module) -> None:
    """Fail when the trainer is built if this torch's FSDP2 lacks what `gathered` and `forget_forwards` use."""
    state = module._get_fsdp_state()
    missing = [
        name
        for name, present in (
            ("FSDPModule.reset_iter_state", hasattr(module, "reset_iter_state")),
            ("FSDPState._fsdp_param_groups", hasattr(state, "_fsdp_param_groups")),
            ("FSDPState._auto_reshard_after_forward", hasattr(state, "_auto_reshard_after_forward")),
        )
        if not present
    ]
    if missing:
        raise RuntimeError(
            f"FSDP2 training needs {', '.join(missing)}, which torch {torch.__version__} does not have. It is tested "
            "with torch 2.13: upgrade torch, or use DDP or DeepSpeed ZeRO-3."
        )


@contextmanager
def output_head(model: torch.nn.Module, vocab_size: int):
    """`scoring.OutputHead` of `model` for the loss. Under FSDP2 the head runs outside the root forward: the FSDP
    modules holding its parameters are gathered once for the block and the head bypasses their per-call hooks.
    A head that is differentiated stays gathered after the block: FSDP reduces its gradients and frees it in the
    backward, like the rest of the model."""
    if not fsdp_modules(model):
        yield OutputHead(model, vocab_size)
        return
    holders = modules_holding(model, OutputHead(model, vocab_size).parameters())
    differentiated = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    with gathered(holders, reshard=not differentiated):
        yield OutputHead(model, vocab_size, module_hooks=False)


def hidden_states_for_head(model: torch.nn.Module, input_ids, attention_mask, vocab_size: int) -> torch.Tensor:
    """`scoring.final_hidden_states` of a trained model, for a loss that projects them with `output_head`; under FSDP2
    the head's unit is gathered again, if freed, when the backward reaches them (`unshard_before_backward`)."""
    hidden = final_hidden_states(model, input_ids, attention_mask)
    if fsdp_modules(model):
        unshard_before_backward(hidden, modules_holding(model, OutputHead(model, vocab_size).parameters()))
    return hidden
