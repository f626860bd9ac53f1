"""Non-learned token-reduction baselines for dynprune's ViT, training-free (or fine-tunable) and FLOPs-matched:
ToMe token merging (:mod:`dynprune.baselines.tome`) and EViT top-k by CLS attention (:mod:`dynprune.baselines.evit`)."""

from dynprune.baselines.evit import EViT, apply_evit, default_locations, pick_evit_keep_rate
from dynprune.baselines.reduce import TokenReducedViT, attend, flops_ratio, pick_for_ratio
from dynprune.baselines.tome import ToMe, apply_tome, merge_tokens, pick_tome_schedule, tome_schedule

__all__ = ["EViT", "ToMe", "TokenReducedViT", "apply_evit", "apply_tome", "attend", "default_locations",
           "flops_ratio", "merge_tokens", "pick_evit_keep_rate", "pick_for_ratio", "pick_tome_schedule",
           "tome_schedule"]
