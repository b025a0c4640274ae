"""A ReferFormer checkpoint written from ReferFormer's own parameter list (not from avseg's model).

The key names and shapes below are transcribed from the constructors of ReferFormer
(wjn922/ReferFormer: ``models/referformer.py`` ``ReferFormer.__init__``, ``models/backbone.py``,
``models/deformable_transformer.py``, ``models/segmentation.py`` ``CrossModalFPNDecoder`` /
``VisionLanguageBlock`` / ``VisionLanguageFusionModule``) for the options given to
``referformer_shapes`` (defaults: ``opts.py`` + ``--with_box_refine --binary``, the R50 pretraining
command). The backbone is torchvision's ResNet with ``FrozenBatchNorm2d`` minus ``avgpool``/``fc``
(ReferFormer's ``IntermediateLayerGetter`` over ``torchvision.models.<name>``), so its keys come
from torchvision. RoBERTa-base keys follow HuggingFace's ``RobertaModel``.

``write_referformer_checkpoint`` saves ``{"model", "optimizer", "lr_scheduler", "epoch", "args"}``
as ReferFormer's ``main.py`` does, ``args`` an ``argparse.Namespace``. The tensors of groups that
avseg skips (text encoder) are stride-0 views of one number: real shapes, tiny file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}.weight": (out_f, in_f)}
    if bias:
        shapes[f"{prefix}.bias"] = (out_f,)
    return shapes


def _norm(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _mha(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    """torch.nn.MultiheadAttention(dim, heads): packed in-projection, out_proj."""
    return {
        f"{prefix}.in_proj_weight": (3 * dim, dim),
        f"{prefix}.in_proj_bias": (3 * dim,),
        **_linear(f"{prefix}.out_proj", dim, dim),
    }


def _msdeform(prefix: str, dim: int, levels: int, heads: int, points: int) -> dict[str, tuple[int, ...]]:
    return {
        **_linear(f"{prefix}.sampling_offsets", heads * levels * points * 2, dim),
        **_linear(f"{prefix}.attention_weights", heads * levels * points, dim),
        **_linear(f"{prefix}.value_proj", dim, dim),
        **_linear(f"{prefix}.output_proj", dim, dim),
    }


def _mlp(prefix: str, in_dim: int, hidden: int, out_dim: int, layers: int) -> dict[str, tuple[int, ...]]:
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        shapes.update(_linear(f"{prefix}.layers.{i}", b, a))
    return shapes


def _roberta_base(prefix: str = "text_encoder") -> dict[str, tuple[int, ...]]:
    shapes = {
        f"{prefix}.embeddings.word_embeddings.weight": (50265, 768),
        f"{prefix}.embeddings.position_embeddings.weight": (514, 768),
        f"{prefix}.embeddings.token_type_embeddings.weight": (1, 768),
        **_norm(f"{prefix}.embeddings.LayerNorm", 768),
        **_linear(f"{prefix}.pooler.dense", 768, 768),
    }
    for i in range(12):
        layer = f"{prefix}.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            shapes.update(_linear(f"{layer}.attention.self.{name}", 768, 768))
        shapes.update(_linear(f"{layer}.attention.output.dense", 768, 768))
        shapes.update(_norm(f"{layer}.attention.output.LayerNorm", 768))
        shapes.update(_linear(f"{layer}.intermediate.dense", 3072, 768))
        shapes.update(_linear(f"{layer}.output.dense", 768, 3072))
        shapes.update(_norm(f"{layer}.output.LayerNorm", 768))
    return shapes


def referformer_backbone(name: str = "resnet50") -> dict[str, torch.Tensor]:
    """``backbone.0.body.*``: torchvision ResNet with FrozenBatchNorm2d, up to layer4."""
    net = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
    return {f"backbone.0.body.{k}": v for k, v in net.state_dict().items() if not k.startswith(("fc.", "avgpool."))}


def referformer_shapes(
    *,
    hidden_dim: int = 256,
    dim_feedforward: int = 2048,
    enc_layers: int = 4,
    dec_layers: int = 4,
    nheads: int = 8,
    enc_n_points: int = 4,
    dec_n_points: int = 4,
    num_feature_levels: int = 4,
    num_queries: int = 5,
    num_classes: int = 1,
    mask_dim: int = 256,
    controller_layers: int = 3,
    dynamic_mask_channels: int = 8,
    rel_coord: bool = True,
    backbone_channels: tuple[int, int, int, int] = (256, 512, 1024, 2048),
    with_box_refine: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Every non-backbone parameter of ReferFormer (key -> shape) for the given options."""
    c = hidden_dim
    shapes: dict[str, tuple[int, ...]] = {}
    # input_proj: 1x1 conv + GN(32) for the last three backbone levels, then a stride-2 3x3 conv
    for i, in_ch in enumerate(backbone_channels[-3:]):
        shapes.update({f"input_proj.{i}.0.weight": (c, in_ch, 1, 1), f"input_proj.{i}.0.bias": (c,)})
        shapes.update(_norm(f"input_proj.{i}.1", c))
    in_ch = backbone_channels[-1]
    for i in range(3, num_feature_levels):
        shapes.update({f"input_proj.{i}.0.weight": (c, in_ch, 3, 3), f"input_proj.{i}.0.bias": (c,)})
        shapes.update(_norm(f"input_proj.{i}.1", c))
        in_ch = c
    # deformable transformer
    shapes["transformer.level_embed"] = (num_feature_levels, c)
    shapes.update(_linear("transformer.reference_points", 2, c))
    for i in range(enc_layers):
        p = f"transformer.encoder.layers.{i}"
        shapes.update(_msdeform(f"{p}.self_attn", c, num_feature_levels, nheads, enc_n_points))
        shapes.update(_norm(f"{p}.norm1", c))
        shapes.update(_linear(f"{p}.linear1", dim_feedforward, c))
        shapes.update(_linear(f"{p}.linear2", c, dim_feedforward))
        shapes.update(_norm(f"{p}.norm2", c))
    for i in range(dec_layers):
        p = f"transformer.decoder.layers.{i}"
        shapes.update(_msdeform(f"{p}.cross_attn", c, num_feature_levels, nheads, dec_n_points))
        shapes.update(_norm(f"{p}.norm1", c))
        shapes.update(_mha(f"{p}.self_attn", c))
        shapes.update(_norm(f"{p}.norm2", c))
        shapes.update(_linear(f"{p}.linear1", dim_feedforward, c))
        shapes.update(_linear(f"{p}.linear2", c, dim_feedforward))
        shapes.update(_norm(f"{p}.norm3", c))
    # heads: with_box_refine clones class/box heads per decoder layer and hands the box heads to the
    # decoder as well (transformer.decoder.bbox_embed: the same modules under a second name)
    for i in range(dec_layers):
        shapes.update(_linear(f"class_embed.{i}", num_classes, c))
        shapes.update(_mlp(f"bbox_embed.{i}", c, c, 4, 3))
        if with_box_refine:
            shapes.update(_mlp(f"transformer.decoder.bbox_embed.{i}", c, c, 4, 3))
    shapes["query_embed.weight"] = (num_queries, c)
    # text branch
    shapes.update(_roberta_base())
    shapes.update(_linear("resizer.fc", c, 768))
    shapes.update(_norm("resizer.layer_norm", c))
    shapes.update(_mha("fusion_module.multihead_attn", c))
    # CrossModalFPNDecoder(feature_channels=[res2 channels] + 3 * [c], conv_dim=c, mask_dim, norm="GN")
    feature_channels = [backbone_channels[0]] + 3 * [c]
    for idx, in_ch in enumerate(feature_channels):
        stage = idx + 1
        shapes[f"pixel_decoder.adapter_{stage}.weight"] = (c, in_ch, 1, 1)
        shapes.update(_norm(f"pixel_decoder.adapter_{stage}.norm", c))
        shapes[f"pixel_decoder.layer_{stage}.weight"] = (c, c, 3, 3)
        shapes.update(_norm(f"pixel_decoder.layer_{stage}.norm", c))
        block = f"pixel_decoder.cross_attn_{stage}"
        shapes.update(_mha(f"{block}.self_attn", c))
        shapes.update(_mha(f"{block}.multihead_attn", c))
        shapes.update(_linear(f"{block}.linear1", dim_feedforward, c))
        shapes.update(_linear(f"{block}.linear2", c, dim_feedforward))
        for n in (1, 2, 3):
            shapes.update(_norm(f"{block}.norm{n}", c))
    shapes.update(
        {"pixel_decoder.mask_features.weight": (mask_dim, c, 3, 3), "pixel_decoder.mask_features.bias": (mask_dim,)}
    )
    # dynamic mask head controller: MLP(c, c, sum(weight_nums) + sum(bias_nums), 3)
    in_ch = mask_dim + (2 if rel_coord else 0)
    weight_nums, bias_nums = [], []
    for layer in range(controller_layers):
        if layer == 0:
            weight_nums.append(in_ch * dynamic_mask_channels)
            bias_nums.append(dynamic_mask_channels)
        elif layer == controller_layers - 1:
            weight_nums.append(dynamic_mask_channels)
            bias_nums.append(1)
        else:
            weight_nums.append(dynamic_mask_channels * dynamic_mask_channels)
            bias_nums.append(dynamic_mask_channels)
    shapes.update(_mlp("controller", c, c, sum(weight_nums) + sum(bias_nums), 3))
    return shapes


def referformer_state(*, backbone: str = "resnet50", seed: int = 0, **options) -> dict[str, torch.Tensor]:
    """A full ReferFormer state dict with random values (text encoder as stride-0 views)."""
    generator = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in referformer_backbone(backbone).items()
    }
    if backbone in ("resnet18", "resnet34"):
        options.setdefault("backbone_channels", (64, 128, 256, 512))
    for key, shape in referformer_shapes(**options).items():
        if key.startswith("text_encoder."):
            state[key] = torch.zeros(1).expand(*shape)
        else:
            state[key] = torch.randn(shape, generator=generator)
    # the decoder's alias of the per-layer box heads holds the same tensors
    for key in [k for k in state if k.startswith("transformer.decoder.bbox_embed.")]:
        state[key] = state[key.removeprefix("transformer.decoder.")]
    return state


def write_referformer_checkpoint(path: Path, state: dict[str, torch.Tensor], **args) -> Path:
    """Save as ReferFormer's main.py: model, optimizer, lr_scheduler, epoch, args (a Namespace)."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-4, weight_decay=5e-4)
    param.grad = torch.ones(2)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [8, 10])
    namespace = argparse.Namespace(
        lr=1e-4,
        backbone="resnet50",
        with_box_refine=True,
        enc_layers=4,
        dec_layers=4,
        dim_feedforward=2048,
        mask_dim=256,
        lr_drop=[8, 10],
        binary=True,
        **args,
    )
    torch.save(
        {
            "model": state,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 11,
            "args": namespace,
        },
        path,
    )
    return path
