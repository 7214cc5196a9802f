"""generate() on a model sharded with FSDP2 (`fully_shard`): the weights are gathered once for the whole generation."""

import functools


def fsdp_modules(model) -> list:
    """The modules of `model` that FSDP2 (`fully_shard`) shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def gathers_fsdp_weights(generate):
    """generate() on an FSDP2-sharded model: the full weights are all-gathered once, on entry (every rank must call
    generate(), as for any FSDP forward), and kept until the end. The model is used outside its root forward (the
    adaLN modulations, the output layer), which FSDP's hooks would not unshard, and with no resharding after each
    call the ranks make no collective call while generating, so they may stop at different lengths."""

    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        modules = fsdp_modules(self)
        if not modules:
            return generate(self, *args, **kwargs)
        if modules[0] is not self:
            # the FSDP root is a module around this one (a PeftModel that accelerate sharded), or none was sharded
            # at the top: its weights are out of reach here, and a forward through a layer first would make that
            # layer the root for good
            raise ValueError("generate() on an FSDP2-sharded model needs that model to be the FSDP root "
                             "(fully_shard(model) after its layers); here the root is an outer module (e.g. a "
                             "PeftModel) or missing. Generate from a full copy of the weights instead, e.g. a model "
                             "loaded from the saved checkpoint.")
        # FSDP takes the first module to run forward as its root: the outermost one must be, as in training
        self._get_fsdp_state()._lazy_init()
        settings = [_reshard_setting(module) for module in modules]
        try:
            for module in modules:
                _keep_unsharded_after_forward(module)
                module.unshard()
            return generate(self, *args, **kwargs)
        finally:
            for module, setting in zip(modules, settings):
                _restore_reshard_setting(module, setting)
                module.reshard()

    return wrapper


def _keep_unsharded_after_forward(module) -> None:
    if hasattr(module, "set_reshard_after_forward"):  # torch >= 2.7
        module.set_reshard_after_forward(False, recurse=False)
        return
    for group in _param_groups(module._get_fsdp_state()):  # what that setter sets
        group.post_forward_mesh_info = None


def _reshard_setting(module):
    # FSDP2 has a setter for reshard_after_forward but no getter: what it sets, read to be put back as it was
    state = module._get_fsdp_state()
    auto = getattr(state, "_auto_reshard_after_forward", None)  # torch >= 2.12
    return auto, [group.post_forward_mesh_info for group in _param_groups(state)]


def _restore_reshard_setting(module, setting) -> None:
    state = module._get_fsdp_state()
    auto, mesh_infos = setting
    if auto is not None:
        state._auto_reshard_after_forward = auto
    for group, mesh_info in zip(_param_groups(state), mesh_infos):
        group.post_forward_mesh_info = mesh_info


def _param_groups(state) -> list:
    """A module's FSDP parameter groups: a list in recent torch, one group (or None) before."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]
