"""Static pruning baselines on Torch-Pruning's dependency groups: ``torch.nn.utils.prune`` methods and
channel criteria, iterative schedules, physical channel removal, FLOPs-matched thin models
(``prune_to_flops``) and reports; fine-tuning runs through the project's one Lightning loop."""

from dynprune.static.callback import StaticPruning, physical_flops
from dynprune.static.channel_removal import (
    fraction_for_flops,
    load_pruned_state_dict,
    prune_to_flops,
    remove_channels,
)
from dynprune.static.dependency import ChannelGroup, channel_groups
from dynprune.static.finetune import accuracy, finetune
from dynprune.static.prune import (
    channel_scores,
    channel_sparsity,
    global_sparsity,
    layer_sparsity,
    list_criteria,
    list_pruners,
    make_permanent,
    mask_channels,
    prune_model,
    register_criterion,
    register_pruner,
    weight_layers,
)
from dynprune.static.report import compare_latency, layer_table, measure_latency, param_counts, write_table
from dynprune.static.schedule import RoundResult, iterative_prune, sparsity_schedule

__all__ = [
    "ChannelGroup", "RoundResult", "StaticPruning", "accuracy", "channel_groups", "channel_scores",
    "channel_sparsity", "compare_latency", "finetune", "fraction_for_flops", "global_sparsity", "iterative_prune",
    "layer_sparsity", "layer_table", "list_criteria", "list_pruners", "load_pruned_state_dict", "make_permanent",
    "mask_channels", "measure_latency", "param_counts", "physical_flops", "prune_model", "prune_to_flops",
    "register_criterion", "register_pruner", "remove_channels", "sparsity_schedule", "weight_layers", "write_table",
]
