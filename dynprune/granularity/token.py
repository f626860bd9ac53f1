"""Token granularity (DynamicViT style): at chosen transformer blocks, a per-token predictor decides, per input,
which tokens the rest of the network keeps.

A site is a whole residual block on tokens (N, T, D) whose forward takes a ``keep`` mask (N, T) (dynprune's ViT
``Block``; the trace records it as ``ModuleInfo.takes_keep``). Its gate reads the block's input per token and decides
(N, T, 1); the first ``cls_tokens`` tokens (the CLS token) are always kept, and decisions multiply through depth: a
token dropped at one site stays dropped at every later one. A site's decisions are these cumulative keeps. Every block
from the first site to the end of its container runs with the current mask as ``keep``: dropped tokens are masked
out of attention as keys (the attention's policy, not zeroing), in training and evaluation alike. Compiled
(:mod:`dynprune.runtime.tokens`), they are removed, or masked as here on the masked path (taken per batch size
where it is faster, and always when the readout reads more than the CLS tokens).

FLOPs per input, with k of T tokens kept in a block of a site's span (the site's block up to the next site): its
conv/linear layers (q, k, v, proj, fc1, fc2) scale with k / T, and its other FLOPs (attention's QK^T and AV,
quadratic in k) follow a k + b k^2, fitted when the site is attached from FlopCounterMode counts of the block at
two sequence lengths and checked at a third.

Training term (``ratio_weight`` x DynamicViT's ratio loss): the squared distance of each site's kept fraction of
the non-CLS tokens to its target (``keep_ratios``, or ``keep_ratio ** s`` at the s-th site), per input
(``ratio_scope="input"``, as DynamicViT) or of the batch mean (``"batch"``: inputs may keep different numbers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dynprune.gates import Gate
from dynprune.gates.registry import GATES
from dynprune.granularity.base import (
    FlopsTerms,
    ModuleGranularity,
    Site,
    TermBatch,
    add_gate,
    layers_inside,
    layout_of,
    register_granularity,
)
from dynprune.hooks import HookSwitch
from dynprune.runtime.tokens import BATCH_RUNTIMES, TokenExecutor, with_cls
from dynprune.trace import LayerInfo, Trace

RATIO_SCOPES = ("input", "batch")


@dataclass(frozen=True)
class TokenCost:
    """A block's FLOPs outside its conv/linear layers for k tokens: ``linear`` k + ``quadratic`` k^2 (dense: k = T)."""

    linear: float
    quadratic: float
    tokens: int

    def factor(self, kept: Tensor) -> Tensor:
        """Effective over dense FLOPs for ``kept`` tokens per input (N,)."""
        dense = self.linear * self.tokens + self.quadratic * self.tokens ** 2
        return (self.linear * kept + self.quadratic * kept ** 2) / dense


class KeepHook:
    """Forward pre-hook (with kwargs) of a block in a token chain: the block's ``gate`` (None: not a site) decides
    per token from the block's input, joined with the mask of ``before`` (the previous site's gate; None: the
    first site); the block runs with ``keep`` = the current mask (N, T)."""

    def __init__(self, switch: HookSwitch, cls_tokens: int) -> None:
        self.switch, self.cls_tokens = switch, cls_tokens
        self.gate: Gate | None = None
        self.before: Gate | None = None
        self.chain: TokenChain | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.switch.enabled:
            return None
        if self.gate is None:
            keep = self.before.mask[..., 0]
        else:
            keep = with_cls(self.gate(args[0])[..., 0], self.cls_tokens)
            if self.before is not None:
                keep = keep * self.before.mask[..., 0]
            self.gate.mask = keep[..., None]  # the site's decisions: the cumulative keeps (N, T, 1)
        return args, {**kwargs, "keep": keep}


@dataclass
class TokenChain:
    """The blocks from a container's first token site to its end, in call order, and the sites among them.

    Attributes:
        blocks: block paths; hooks: {block: its KeepHook}; layers: {block: traced conv/linear layers in it};
        costs: {block: its FLOPs outside those layers, as a function of tokens}; cls_tokens: tokens always kept;
        sites: {block: TokenSite}, gates: {block: the site's Gate}, in call order.
    """

    blocks: list[str]
    hooks: dict[str, KeepHook]
    layers: dict[str, tuple[str, ...]]
    costs: dict[str, TokenCost]
    cls_tokens: int
    sites: dict[str, TokenSite] = field(default_factory=dict)
    gates: dict[str, Gate] = field(default_factory=dict)

    def add(self, site: TokenSite, gate: Gate) -> None:
        """Make block ``site.name`` a site: its hook decides, the later blocks up to the next site read its mask."""
        self.sites[site.name], self.gates[site.name] = site, gate
        before = None
        for block in self.blocks:
            hook = self.hooks[block]
            hook.gate, hook.before = self.gates.get(block), before
            before = self.gates.get(block, before)
        for name, each in self.sites.items():
            each.layers = tuple(layer for block in self.span(name) for layer in self.layers[block])

    def span(self, name: str) -> list[str]:
        """The blocks that run with site ``name``'s mask: its own, up to the next site."""
        start = self.blocks.index(name)
        later = [i for i in range(start + 1, len(self.blocks)) if self.blocks[i] in self.sites]
        return self.blocks[start:later[0] if later else len(self.blocks)]


@dataclass
class TokenSite(Site):
    """A token-gated block; ``chain`` it belongs to; ``target``: the kept fraction of non-CLS tokens it aims at."""

    chain: TokenChain | None = None
    target: float = 1.0


@register_granularity("token")
class TokenGranularity(ModuleGranularity):
    """Gates (N, T, 1) per-token keep decisions at transformer blocks, carried through the blocks after them.

    Args:
        keep_ratios: the target kept fraction of the non-CLS tokens at each site, in call order (non-increasing,
            in (0, 1]); default ``keep_ratio ** s`` at the s-th site (s = 1, 2, ...).
        keep_ratio: the geometric schedule's ratio (DynamicViT: 0.7), used without ``keep_ratios``.
        ratio_weight: weight of the ratio loss (0: off, e.g. to train on the FLOPs cost alone).
        ratio_scope: ``input`` (every input's fraction pulled to the target) or ``batch`` (the batch mean).
        cls_tokens: leading tokens that are never dropped (the CLS token; 2 with a distillation token).
        batch_runtime: how the compiled model runs a batch whose inputs keep different numbers of tokens:
            ``group`` (sorted by kept count, padded per group of 16 inputs and masked), ``pad`` (the whole batch
            padded at once) or ``loop`` (one input at a time); see :mod:`dynprune.runtime.tokens` for the
            measurements that chose the default.
    """

    name = "token"
    executor = TokenExecutor()

    def __init__(self, keep_ratios: Sequence[float] | None = None, keep_ratio: float = 0.7, ratio_weight: float = 2.0,
                 ratio_scope: str = "input", cls_tokens: int = 1, batch_runtime: str = "group") -> None:
        super().__init__("tokens")
        if keep_ratios is not None:
            keep_ratios = [float(r) for r in keep_ratios]
            if not keep_ratios or any(not 0 < r <= 1 for r in keep_ratios) or sorted(keep_ratios,
                                                                                    reverse=True) != keep_ratios:
                raise ValueError(f"keep_ratios must be non-increasing fractions in (0, 1], got {keep_ratios}")
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if not (math.isfinite(ratio_weight) and ratio_weight >= 0):
            raise ValueError(f"ratio_weight must be finite and >= 0, got {ratio_weight}")
        if ratio_scope not in RATIO_SCOPES:
            raise ValueError(f"unknown ratio_scope '{ratio_scope}'; choose one of: {', '.join(RATIO_SCOPES)}")
        if isinstance(cls_tokens, bool) or not isinstance(cls_tokens, int) or cls_tokens < 0:
            raise ValueError(f"cls_tokens must be an int >= 0, got {cls_tokens!r}")
        if batch_runtime not in BATCH_RUNTIMES:
            raise ValueError(f"unknown batch_runtime '{batch_runtime}'; choose one of: {', '.join(BATCH_RUNTIMES)}")
        self.keep_ratios, self.keep_ratio, self.ratio_weight = keep_ratios, keep_ratio, ratio_weight
        self.ratio_scope, self.cls_tokens, self.batch_runtime = ratio_scope, cls_tokens, batch_runtime

    def ineligible(self, trace: Trace, name: str) -> str | None:
        if problem := self.module_problem(trace, name):
            return problem
        info = trace.modules[name]
        if len(info.in_shape) != 2 or info.out_shape != info.in_shape:
            return f"it does not map tokens (T, D) to tokens of the same shape ({info.in_shape} -> {info.out_shape})"
        if not info.whole_block:
            return "it contains no residual addition (a whole transformer block does)"
        if not info.takes_keep:
            return ("its forward takes no `keep` mask (N, T) to mask dropped tokens out of attention (dynprune's "
                    "ViT Block does)")
        if info.in_shape[0] <= self.cls_tokens:
            return f"its {info.in_shape[0]} tokens are all kept (cls_tokens={self.cls_tokens})"
        return None

    def default(self, trace: Trace, skip_first: bool, skip_last: bool) -> list[str]:
        """DynamicViT's placement: before the blocks at 1/4, 1/2 and 3/4 of the depth (3, 6, 9 of 12)."""
        blocks = [n for n in trace.modules if n and self.ineligible(trace, n) is None]
        picks = sorted({len(blocks) * k // 4 for k in (1, 2, 3)} - {0})
        return [blocks[i] for i in picks]

    def refuses_gate(self, gate: str) -> str | None:
        if GATES.get(gate).training_loss is not Gate.training_loss:
            return ("its own training term scores the decisions it sampled, while a token site's decisions are "
                    "multiplied through depth")
        return None

    def attach(self, model: nn.Module, trace: Trace, name: str, gate: str, gate_kwargs: dict[str, float],
               switch: HookSwitch) -> Site:
        chain = self._chain(model, trace, name, switch)
        index = len(chain.sites)
        if self.keep_ratios is not None and index >= len(self.keep_ratios):
            raise ValueError(f"keep_ratios {self.keep_ratios} has {len(self.keep_ratios)} entries; '{name}' is token "
                             f"site {index + 1}")
        target = self.keep_ratios[index] if self.keep_ratios is not None else self.keep_ratio ** (index + 1)
        info = trace.modules[name]
        layout = layout_of(info.in_shape, "tokens", per_position=True)
        net, path = add_gate(model, name, gate, info.in_shape[-1], 1, gate_kwargs, layout)
        site = TokenSite(name, self, 1, (), layout, gate_path=path, chain=chain, target=target)
        chain.add(site, net)
        return site

    def _chain(self, model: nn.Module, trace: Trace, name: str, switch: HookSwitch) -> TokenChain:
        """The chain ``name`` is in (made by an earlier site), or a new one: ``name`` and the blocks called after it in
        its container, up to the first that cannot take the mask."""
        hooks = model.get_submodule(name)._forward_pre_hooks.values()
        found = next((h for h in hooks if isinstance(h, KeepHook)), None)
        if found is not None:
            return found.chain
        parent, order = name.rpartition(".")[0], trace.modules[name].order
        siblings = sorted((i.order, n) for n, i in trace.modules.items()
                          if n and n.rpartition(".")[0] == parent and i.order >= order)
        blocks = []
        for _, n in siblings:
            if self.ineligible(trace, n) is not None:
                break
            blocks.append(n)
        chain = TokenChain(blocks, {n: KeepHook(switch, self.cls_tokens) for n in blocks},
                           {n: layers_inside(trace, n) for n in blocks},
                           {n: token_cost(model, trace, n, switch) for n in blocks}, self.cls_tokens)
        for n, hook in chain.hooks.items():
            hook.chain = chain
            model.get_submodule(n).register_forward_pre_hook(hook, with_kwargs=True)
        return chain

    def flops_terms(self, site: Site, mask: Tensor) -> FlopsTerms:
        """Each block of the site's span: its layers x k / T, its other FLOPs x (a k + b k^2) / (a T + b T^2)."""
        chain = site.chain
        fraction = mask.flatten(1).mean(dim=1)  # (N,): k / T (a (N, 1) mask of ones at profile building: 1)
        scale = {}
        for block in chain.span(site.name):
            cost = chain.costs[block]
            scale.update(dict.fromkeys(chain.layers[block], fraction))
            if cost.linear or cost.quadratic:
                scale[block] = cost.factor(fraction * cost.tokens)
        return FlopsTerms(scale=scale)

    def effective(self, site: Site, decisions: Tensor) -> Tensor:
        """The kept tokens (N, T): for the input-dependence report, the units of a token site are its tokens."""
        return decisions.flatten(1)

    def gate_reads(self, site: Site, masks: dict[str, Tensor]) -> Tensor | None:
        """The fraction of the tokens (N,) the site's gate reads: those the chain's previous site kept (the
        compiled model runs it on them only); None at the first site (all of them)."""
        names = [b for b in site.chain.blocks if b in site.chain.sites]
        at = names.index(site.name)
        return masks[names[at - 1]].flatten(1).mean(dim=1) if at else None

    def skips_when_closed(self, site: Site, layers: dict[str, LayerInfo]) -> bool:
        """Every decision off keeps the CLS token alone: less work, never a cut network."""
        return True

    def training_terms(self, batch: TermBatch) -> dict[str, Tensor]:
        """``token_ratio``: ``ratio_weight`` x the mean over sites of the squared distance of the kept fraction of
        non-CLS tokens to the site's target (per input, or of the batch mean)."""
        if self.ratio_weight == 0 or not batch.sites:
            return {}
        losses = []
        for name, site in batch.sites.items():
            kept = batch.gates[name].mask[:, self.cls_tokens:, 0].mean(dim=1)  # (N,)
            kept = kept if self.ratio_scope == "input" else kept.mean(dim=0, keepdim=True)
            losses.append((kept - site.target).square().mean())
        return {"token_ratio": self.ratio_weight * torch.stack(losses).mean()}


@torch.no_grad()
def token_cost(model: nn.Module, trace: Trace, name: str, switch: HookSwitch) -> TokenCost:
    """Block ``name``'s FLOPs outside its traced conv/linear layers as a k + b k^2 in its k tokens, from
    FlopCounterMode counts at T and ceil(T / 2) tokens; a third count (at 1 token) must agree, else ValueError."""
    block = model.get_submodule(name)
    tokens, dim = trace.modules[name].in_shape
    inside = {layer[len(name) + 1:] for layer in layers_inside(trace, name)}
    param = next(model.parameters())

    def other(k: int) -> float:
        with FlopCounterMode(display=False) as counter:
            block(torch.zeros(1, k, dim, dtype=param.dtype, device=param.device))
        counts = {key.partition(".")[2]: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
        return counter.get_total_flops() - sum(counts.get(layer, 0) for layer in inside)

    enabled, switch.enabled = switch.enabled, False
    try:
        half = math.ceil(tokens / 2)
        f_full, f_half, f_one = other(tokens), other(half), other(1)
    finally:
        switch.enabled = enabled
    # f(k) = a k + b k^2 through (T, f_full) and (half, f_half)
    quadratic = (f_full / tokens - f_half / half) / (tokens - half) if tokens != half else 0.0
    linear = f_full / tokens - quadratic * tokens
    if not math.isclose(linear + quadratic, f_one, rel_tol=1e-9, abs_tol=1e-6):
        raise ValueError(f"cannot gate tokens at '{name}': its FLOPs outside conv/linear layers are not a k + b k^2 "
                         f"in its k tokens ({f_full} at {tokens}, {f_half} at {half}, {f_one} at 1)")
    return TokenCost(linear, quadratic, tokens)


def keep_ratio_for(model: nn.Module, ratio: float, rel_tol: float = 0.03) -> float:
    """The geometric ``keep_ratio`` r whose schedule (the first round(r^s x P) of the P patch tokens kept at the s-th
    token site) brings the FLOPs per input of ``model``, gated at granularity ``token`` only, to 1 / ``ratio`` of
    dense (its gates' dense FLOPs included): for arms matched in FLOPs. ValueError where no r lands within
    ``rel_tol`` (relative)."""
    info = getattr(model, "dynprune", None)
    if info is None or {s.granularity for s in info.sites.values()} != {"token"}:
        raise ValueError("keep_ratio_for needs a model gated at granularity 'token' only (dynprune.gate_model)")
    if ratio < 1:
        raise ValueError(f"ratio is a FLOPs reduction >= 1, got {ratio}")
    sites = list(info.sites.values())
    tokens, cls = sites[0].chain.costs[sites[0].name].tokens, sites[0].chain.cls_tokens

    def flops(r: float) -> float:
        masks = {}
        for s, site in enumerate(sites, start=1):
            mask = torch.zeros(1, tokens, 1)
            mask[:, :cls + round(r ** s * (tokens - cls))] = 1.0
            masks[site.name] = mask
        return float(info.flops.effective(masks) + info.flops.gates(masks)) / info.flops.dense_total

    low, high = 0.0, 1.0  # flops(r) grows with r
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if flops(mid) < 1 / ratio else (low, mid)
    best = min((low, high), key=lambda r: abs(flops(r) * ratio - 1))
    if abs(flops(best) * ratio - 1) > rel_tol:
        raise ValueError(f"no keep_ratio brings the FLOPs within {rel_tol:.0%} of 1/{ratio:g} of dense (closest: "
                         f"{flops(best):.3f} at keep_ratio {best:.3f})")
    return best
