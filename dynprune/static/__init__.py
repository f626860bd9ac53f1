"""Static pruning baselines: ``torch.nn.utils.prune`` methods, iterative schedules, physical channel
removal and reports, so static and dynamic pruning are compared in the same framework."""

from dynprune.static.callback import StaticPruning, physical_flops
from dynprune.static.channel_removal import fraction_for_flops, load_pruned_state_dict, remove_channels
from dynprune.static.dependency import ChannelGroup, channel_groups
from dynprune.static.prune import (
    channel_sparsity,
    global_sparsity,
    layer_sparsity,
    list_pruners,
    make_permanent,
    prune_model,
    register_pruner,
    weight_layers,
)
from dynprune.static.report import compare_latency, layer_table, measure_latency, param_counts, write_table
from dynprune.static.schedule import RoundResult, iterative_prune, sparsity_schedule
from dynprune.static.train import evaluate, train_epochs

__all__ = [
    "ChannelGroup", "RoundResult", "StaticPruning", "channel_groups", "channel_sparsity", "compare_latency",
    "evaluate", "fraction_for_flops", "global_sparsity", "iterative_prune", "layer_sparsity", "layer_table",
    "list_pruners", "load_pruned_state_dict", "make_permanent", "measure_latency", "param_counts",
    "physical_flops", "prune_model", "register_pruner", "remove_channels", "sparsity_schedule", "train_epochs",
    "weight_layers", "write_table",
]
