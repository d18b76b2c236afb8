"""CvT: Convolutional vision Transformer (Wu et al., 2021, arXiv 2103.15808), top to bottom.

Module and parameter names follow the official implementation (microsoft/CvT), so that an official
state dict loads after renaming only `stageN.` to `stages.N.` (see convert.py).

Shapes: B batch, C channels of a stage, H x W its feature map, N = H*W tokens, T = N (+1 with a cls token).
Tokens are (B, T, C); maps are (B, C, H, W). Going from tokens to a map is a view with channels-last strides,
which depthwise convolutions and LayerNorm both take without a copy.

Speed: the state dict and the fp32 outputs are those of the plain formulation; this file reads as that
formulation, and the layers that compute a part of it faster live in layers.py, whose docstring has the speed notes
(docs/performance.md the measurements): QuickGELU with a one-kernel backward, the conv projections (BatchNorm folded
in eval mode, k/v in fp32 when training on CPU, one cast of the map) and SoftmaxAttention (SDPA, or the plain
softmax where SDPA's CPU backward is slow). Here: channels-last maps throughout, and the cls token joined after the
q/k/v Linear layers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from .layers import (
    QuickGELU,
    SoftmaxAttention,
    conv_projection,
    make_act,
    projection_inputs,
)
from .presets import ModelConfig, StageConfig, check_batch_of_one, stage_map_sizes


def tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, C) -> (B, C, H, W) as a view (channels-last strides when x is contiguous)."""
    return x.transpose(1, 2).unflatten(2, (h, w))


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C); free for a channels-last map."""
    return x.flatten(2).transpose(1, 2)


class ConvEmbed(nn.Module):
    """Convolutional token embedding: Conv2d then LayerNorm over channels. `patch` = ViT-style, kernel == stride."""

    def __init__(self, in_chans: int, s: StageConfig, eps: float):
        super().__init__()
        if s.embed == "patch":
            kernel, stride, padding = s.patch_stride, s.patch_stride, 0
        else:
            kernel, stride, padding = s.patch_size, s.patch_stride, s.patch_padding
        self.proj = nn.Conv2d(in_chans, s.dim_embed, kernel, stride, padding)
        self.norm = nn.LayerNorm(s.dim_embed, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        # A channels-last input gives a channels-last output, whose token view below is free (a no-op for the maps
        # of earlier stages, which are channels-last views of their tokens already).
        x = self.proj(x.contiguous(memory_format=torch.channels_last))  # (B, C, H, W)
        h, w = x.shape[-2:]
        return self.norm(map_to_tokens(x)), h, w  # (B, N, C)


class Attention(nn.Module):
    """Multi-head attention with convolutional projections of q, k and v."""

    def __init__(self, s: StageConfig):
        super().__init__()
        dim, self.num_heads, self.has_cls = s.dim_embed, s.num_heads, s.cls_token
        self.scale = (dim if s.attn_scale == "dim" else dim // s.num_heads) ** -0.5  # official: the whole width
        # The official code leaves q unprojected when k and v are average-pooled.
        q_method = "linear" if s.qkv_proj_method == "avg" else s.qkv_proj_method
        self.conv_proj_q = conv_projection(dim, q_method, s.kernel_qkv, s.padding_q, s.stride_q)
        self.conv_proj_k = conv_projection(dim, s.qkv_proj_method, s.kernel_qkv, s.padding_kv, s.stride_kv)
        self.conv_proj_v = conv_projection(dim, s.qkv_proj_method, s.kernel_qkv, s.padding_kv, s.stride_kv)
        self.proj_q = nn.Linear(dim, dim, bias=s.qkv_bias)
        self.proj_k = nn.Linear(dim, dim, bias=s.qkv_bias)
        self.proj_v = nn.Linear(dim, dim, bias=s.qkv_bias)
        self.attend = SoftmaxAttention(self.scale, s.attn_drop_rate)  # SDPA or plain softmax: see layers.py
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(s.drop_rate)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, t, c = x.shape
        if self.has_cls:  # the cls token bypasses the convolutions (split, unlike slicing, has a one-copy backward)
            cls, x = x.split((1, t - 1), dim=1)
        mq, mkv = projection_inputs(tokens_to_map(x, h, w), self.conv_proj_k)  # (B, C, H, W), cast once
        q = self.proj_q(map_to_tokens(self.conv_proj_q(mq)))  # (B, N, C)
        k = self.proj_k(map_to_tokens(self.conv_proj_k(mkv)))  # (B, N / stride_kv^2, C)
        v = self.proj_v(map_to_tokens(self.conv_proj_v(mkv)))
        if self.has_cls:  # joined after the Linear layers (per token, so the same): the convs' gradients stay dense
            q, k, v = (
                torch.cat((proj(cls), y), dim=1) for proj, y in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v))
            )
        q, k, v = (y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, heads, T, C/heads)
        x = self.attend(q, k, v).transpose(1, 2).reshape(b, t, c)  # (B, T, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, s: StageConfig, act: str, eps: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(s.dim_embed, eps=eps)
        self.attn = Attention(s)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(s.dim_embed, eps=eps)
        self.mlp = Mlp(s.dim_embed, int(s.dim_embed * s.mlp_ratio), act, s.drop_rate)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Token embedding, optional position embedding and cls token, then `depth` blocks."""

    def __init__(self, in_chans: int, s: StageConfig, act: str, eps: float, grid: tuple[int, int]):
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, s, eps)
        # Learned position embedding for the map size of the configured image size; resized for other sizes.
        self.pos_embed = nn.Parameter(torch.zeros(1, s.dim_embed, *grid)) if s.pos_embed else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.dim_embed)) if s.cls_token else None
        self.pos_drop = nn.Dropout(s.drop_rate)
        # Stochastic depth grows linearly over the blocks of this stage, from 0 to drop_path_rate.
        rates = torch.linspace(0, s.drop_path_rate, s.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(s, act, eps, r) for r in rates)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, h, w = self.patch_embed(x)  # (B, N, C)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != (h, w):
                pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
            x = x + map_to_tokens(pos)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + N, C)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x, h, w)
        cls = None
        if self.cls_token is not None:
            cls, x = x.split((1, x.shape[1] - 1), dim=1)
        return tokens_to_map(x, h, w), cls


class CvT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        grids = stage_map_sizes(cfg, (cfg.image_size, cfg.image_size))
        in_chans, stages = cfg.in_chans, []
        for s, grid in zip(cfg.stages, grids):
            stages.append(Stage(in_chans, s, cfg.act, cfg.ln_eps, grid))
            in_chans = s.dim_embed
        self.stages = nn.ModuleList(stages)
        self.num_features = in_chans
        # timm's description of the stage maps a backbone returns: channels, stride to the input, module name
        self.feature_info = feature_info(cfg)
        self.norm = nn.LayerNorm(in_chans, eps=cfg.ln_eps)
        self.head = nn.Linear(in_chans, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self._checked_sizes: set[tuple[int, int]] = set()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Linear weights trunc-normal std 0.02 (or Xavier), zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if self.cfg.init == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:
            for p in (stage.cls_token, stage.pos_embed):
                if p is not None:
                    nn.init.trunc_normal_(p, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters kept out of weight decay: norms, biases, cls tokens, position embeddings."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(("cls_token", "pos_embed"))}

    def check_input(self, x: torch.Tensor) -> None:
        """Host-side checks of an input size, once per size: a clear message instead of a conv error deep inside."""
        if torch.compiler.is_compiling():  # a guard on the set would recompile each new size
            return
        size = tuple(x.shape[-2:])
        if size not in self._checked_sizes:
            stage_map_sizes(self.cfg, size)
            self._checked_sizes.add(size)
        if self.training and x.shape[0] == 1 and not any(isinstance(m, nn.SyncBatchNorm) for m in self.modules()):
            check_batch_of_one(self.cfg, size)  # (SyncBatchNorm pools the statistics of every rank's batch)

    def pool(self, x: torch.Tensor, cls: torch.Tensor | None) -> torch.Tensor:
        """The last stage's map (B, C, H, W) and cls token (B, 1, C) -> the (B, C) features the head classifies."""
        if cls is not None:
            return self.norm(cls[:, 0])
        return self.norm(map_to_tokens(x)).mean(dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        cls = None
        for stage in self.stages:
            x, cls = stage(x)
        return self.pool(x, cls)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # ------------------------------------------------------------------------------ backbone for dense tasks
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's contract: the stage maps `indices` selects, and the final features.

        indices: None = every stage, an int n = the last n stages, a list = those stages (negative from the end).
        The maps are each stage's output without its cls token, as the official code returns them: (B, C_i, H_i, W_i)
        for output_fmt="NCHW", (B, H_i * W_i, C_i) for "NLC". norm: the final LayerNorm on the last stage's map (the
        one map of its width). stop_early: run no stage after the last selected one (intermediates_only implies it:
        nothing after is used). Returns the list alone with intermediates_only, else (final, list): final is
        forward_features(x), the (B, C) input of `head`, when the last stage ran, and the output of the last stage
        that ran (in output_fmt) when stop_early ended before it.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"forward_intermediates: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = take_indices(len(self.stages), indices)
        self.check_input(x)
        stages = self.stages[: last + 1] if stop_early or intermediates_only else self.stages
        maps, cls = [], None
        for i, stage in enumerate(stages):
            x, cls = stage(x)  # (B, C_i, H_i, W_i), (B, 1, C_i) or None
            if i in take:
                y = x
                if norm and i == len(self.stages) - 1:
                    y = tokens_to_map(self.norm(map_to_tokens(x)), *x.shape[-2:])
                maps.append(map_to_tokens(y) if output_fmt == "NLC" else y)
        if intermediates_only:
            return maps
        if len(stages) < len(self.stages):
            return (map_to_tokens(x) if output_fmt == "NLC" else x), maps
        return self.pool(x, cls), maps

    def prune_intermediate_layers(
        self, indices: int | list[int] | tuple[int, ...] | None = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop what forward_intermediates(indices) does not need: the stages after the last selected one, the head
        (prune_head) and the final norm (prune_norm, or when the last stage goes: it has that stage's width).
        self.cfg is cut to the stages kept; returns the absolute indices."""
        take, last = take_indices(len(self.stages), indices)
        if not prune_head and last < len(self.stages) - 1:
            raise ValueError(
                "prune_intermediate_layers: the head classifies the last stage's features; keeping it "
                "while pruning that stage needs prune_head=True"
            )
        self.stages = self.stages[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm or last < len(self.cfg.stages) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.head = nn.Identity()
        self.num_features = self.cfg.stages[last].dim_embed
        self.cfg = dataclasses.replace(
            self.cfg, stages=self.cfg.stages[: last + 1], num_classes=0 if prune_head else self.cfg.num_classes
        )
        self._checked_sizes.clear()
        return take


def take_indices(num_stages: int, indices: int | list[int] | tuple[int, ...] | None) -> tuple[list[int], int]:
    """timm's `feature_take_indices`: None = all, n = the last n, a list = those (negative from the end);
    returns the absolute indices and the largest."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices: the last {indices} stages of {num_stages}; use 1 to {num_stages}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = [i + num_stages if i < 0 else i for i in indices]
        bad = [i for i, j in zip(indices, take) if not 0 <= j < num_stages]
        if bad or not take:
            raise ValueError(
                f"indices: {list(indices)} selects no stage or one out of range; a model with "
                f"{num_stages} stages has indices 0 to {num_stages - 1} (or -{num_stages} to -1)"
            )
    return take, max(take)


def feature_info(cfg: ModelConfig) -> list[dict]:
    """Per stage: num_chs (C_i), reduction (the input's size over the map's, the product of the embedding strides:
    4, 8, 16 for CvT-13; exact when the input size is a multiple of it) and module (`stages.i`), as in timm."""
    info, reduction = [], 1
    for i, s in enumerate(cfg.stages):
        reduction *= s.patch_stride
        info.append({"num_chs": s.dim_embed, "reduction": reduction, "module": f"stages.{i}"})
    return info


class Backbone(nn.Module):
    """A CvT trunk that returns its stage maps [(B, C_i, H_i, W_i) for i in out_indices], for detection and
    segmentation necks (FPN, UPerNet); `feature_info` lists each map's channels and stride. The model keeps its own
    names under `model.` (`model.stages.0...`), and nothing after the last map it returns."""

    def __init__(self, model: CvT, out_indices: tuple[int, ...] = (0, 1, 2), output_fmt: str = "NCHW"):
        super().__init__()
        self.out_indices = model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        self.model, self.output_fmt = model, output_fmt
        self.feature_info = [model.feature_info[i] for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, self.out_indices, output_fmt=self.output_fmt, intermediates_only=True
        )


def create_backbone(
    name_or_config="cvt13",
    out_indices: tuple[int, ...] = (0, 1, 2),
    checkpoint=None,
    use_ema: bool = False,
    output_fmt: str = "NCHW",
    **overrides,
) -> Backbone:
    """A CvT backbone: the preset (or model config) with its keyword overrides, the weights of `checkpoint` when
    given (ours, official or HF, the file's classifier ignored), cut after the last of `out_indices`."""
    from .convert import load_checkpoint  # (convert imports nothing from here; kept local to read top to bottom)
    from .presets import model_config

    model = CvT(model_config(name_or_config, **overrides))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, drop_head=True, use_ema=use_ema)
    return Backbone(model, tuple(out_indices), output_fmt)


COMPILE_MODES = ("full", "regional")


def compile_model(model: nn.Module, mode: str = "full") -> nn.Module:
    """torch.compile for a CvT (or a module holding one, e.g. DistributedDataParallel); returns what to call.

    full: `torch.compile(model)`, one graph for the whole forward (and one for its backward); `model` itself stays
    eager and its state dict keeps its names. regional: each transformer Block is compiled in place
    (`block.compile(dynamic=False)`) and `model` is returned: blocks of the same shape share one graph, so CvT-13
    compiles 2-3x faster (3 block graphs instead of the whole model), while the patch embeddings, the head and the
    loss stay eager. dynamic=False because the blocks of all stages run the same code with different sizes, which
    would otherwise make dynamo mark them dynamic, and Inductor fails on the dynamic graph (torch 2.14); so each new
    batch size, precision or grad mode costs one graph per stage (dynamo's recompile limit is 8 per code object).
    Measured on a 2-core CPU (docs/performance.md, "torch.compile on CPU"): training runs at eager speed (full) or
    1-7% slower (regional); full compile makes inference 3-45% faster.
    """
    if mode == "full":
        return torch.compile(model)
    if mode == "regional":
        for block in (m for m in model.modules() if isinstance(m, Block)):
            block.compile(dynamic=False)
        return model
    raise ValueError(f"compile_model: unknown mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "Backbone",
    "CvT",
    "QuickGELU",
    "compile_model",
    "create_backbone",
    "feature_info",
    "num_params",
    "take_indices",
]
