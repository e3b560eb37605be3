"""The ATRC head written block by block from its own modules: the method as the spec states it
(and as the original evaluates it), the reference the batched head is compared against.

Nothing here batches anything: every CP block is called on its own pair, the aux heads one by one,
``out_proj`` on the concatenation of a target's block outputs. Random draws come in the head's
order (the search's Gumbel weights pair by pair, row by row; the dropouts target by target).
"""

from __future__ import annotations

import torch

from atrc_exp.models.context_blocks import spatial_softmax
from atrc_exp.models.heads import MultiTaskFCNHead
from atrc_exp.models.layers import concat_features, resize_to


def reference_atrc_module(mod, feats: dict, probs: dict) -> dict:
    """:class:`~atrc_exp.models.relational_head.ATRCModule` block by block."""
    out = {}
    for t in mod.tasks:
        ctx = [
            blk(feats[t], feats[s], target_prob=probs.get(t), source_prob=probs.get(s))
            for s, blk in mod.cp_blocks[t].items()
        ]
        if ctx:
            out[t] = mod.bottleneck[t](torch.cat([feats[t], mod.out_proj[t](torch.cat(ctx, dim=1))], dim=1))
        else:
            out[t] = mod.bottleneck[t](feats[t])
    return out


def reference_head(head, x: torch.Tensor, image: torch.Tensor | None = None) -> dict:
    """A :class:`~atrc_exp.models.relational_head.RelationalContextHead` or
    :class:`~atrc_exp.models.heads.MultiTaskFCNHead` block by block."""
    feats = {t: head.bottleneck[t](x) for t in head.tasks}
    if isinstance(head, MultiTaskFCNHead):
        return {"final": {t: head.final_logits[t](feats[t]) for t in head.tasks}}
    aux, probs = {}, {}
    for t in head.aux_tasks:
        aux[t] = head.aux_logits[t](head.aux_conv[t](x.detach()))
        probs[t] = spatial_softmax(aux[t], image)
    out = reference_atrc_module(head.atrc_module, feats, probs)
    result = {"final": {t: head.final_logits[t](out[t]) for t in head.tasks}}
    if aux:
        result["aux"] = aux
    return result


def reference_model(model, image: torch.Tensor) -> dict:
    """A :class:`~atrc_exp.models.model.MultiTaskModel` with its head block by block."""
    out = reference_head(model.head, concat_features(model.backbone(image)), image)
    size = tuple(image.shape[-2:])
    return {k: {t: resize_to(v, size) for t, v in d.items()} for k, d in out.items()}
