"""Shape-reading helpers the layouts share.

PyTorch layouts store attention as ``(heads * head_dim, width)`` matrices, so the number of
heads is not in any shape. Every one of these code bases defaults to 64-dimensional heads
(timm's and Google's ViT-Ti/S/B/L/H, jeonsworld's configs, vit-pytorch's ``dim_head=64``);
:func:`heads_from_attn_dim` assumes that, the layout's ``num_heads`` carry names the
argument, and the conversion report says so. Callers that know better pass ``num_heads``
(``vitconv convert --num-heads``), which arrives in the :class:`~.registry.Probe`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from vitconv.config import ViTConfig
from vitconv.errors import MappingError
from vitconv.layouts.table import Carry, When
from vitconv.layouts.layout import Probe

Shapes = Dict[str, Tuple[int, ...]]
#: The head size every supported PyTorch code base uses by default.
DEFAULT_HEAD_DIM = 64


def heads_carry(argument: Optional[str], key: Optional[str] = None, **more: Any) -> Carry:
    """``num_heads`` where the weights do not record it: 64-dim heads assumed."""
    return Carry("num_heads", key=key, argument=argument,
                 default=lambda cfg: cfg.attn_dim // DEFAULT_HEAD_DIM if cfg.attn_dim % DEFAULT_HEAD_DIM == 0 else None,
                 **more)


def count_blocks(shapes: Shapes, pattern: str, what: str, path: Optional[str]) -> int:
    """Number of encoder blocks, requiring them to be numbered ``0..N-1``."""
    rx = re.compile(pattern)
    idx = sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})
    if not idx:
        raise MappingError(f"no {what} tensors: not a ViT checkpoint in this layout", path)
    if idx != list(range(len(idx))):
        raise MappingError(f"encoder blocks are not numbered 0..N-1 (found {idx[:8]}…)", path)
    return len(idx)


def heads_from_attn_dim(attn_dim: int, probe: Probe, recorded: Optional[int] = None) -> Tuple[int, int]:
    """``(heads, head_dim)`` for an attention width: the file's own record (``recorded``,
    e.g. a config.json), else the caller's ``--num-heads``, else 64-dim heads. A given count
    that contradicts the file's record is an error, not something to note over."""
    given = probe.num_heads
    if recorded is not None:
        if given is not None and given != recorded:
            raise MappingError(f"num_heads={given}, but the checkpoint records {recorded} heads", probe.path)
        given = recorded
    if given is not None:
        if given <= 0 or attn_dim % given:
            raise MappingError(f"{given} heads do not divide the attention width {attn_dim}", probe.path)
        return given, attn_dim // given
    if attn_dim % DEFAULT_HEAD_DIM:
        raise MappingError(f"attention width {attn_dim} is not a multiple of 64, so the number of "
                           "heads cannot be assumed; pass --num-heads", probe.path)
    return attn_dim // DEFAULT_HEAD_DIM, DEFAULT_HEAD_DIM


def grid_from_tokens(n_tokens: int, prefix: int, key: str, path: Optional[str]) -> int:
    """Side of the square patch grid held by a position table of ``n_tokens`` rows."""
    n = n_tokens - prefix
    g = int(round(max(n, 0) ** 0.5))
    if n <= 0 or g * g != n:
        raise MappingError(f"{key} has {n_tokens} rows, which is not {prefix} prefix token(s) plus "
                           "a square grid", path)
    return g


def need(shapes: Shapes, key: str, layout: str, path: Optional[str]) -> Tuple[int, ...]:
    if key not in shapes:
        raise MappingError(f"not a {layout} checkpoint: missing {key!r}", path)
    return shapes[key]


def config_json(probe: Probe) -> Mapping[str, Any]:
    """The ``config.json`` that came with the weights (a model directory), or ``{}``: parsed
    and checked once, when the directory was opened (:func:`vitconv.formats.hf_dir.read_documents`)."""
    return probe.config


def timm_model_args(probe: Probe) -> Dict[str, Any]:
    """``model_args`` of a timm directory's ``config.json`` (the constructor arguments timm's
    ``push_to_hf_hub`` records); empty for a bare state dict."""
    d = config_json(probe)
    if "architecture" not in d:
        return {}
    args = d.get("model_args", {})
    if not isinstance(args, dict):
        raise MappingError("config.json: model_args is not an object", probe.path)
    return args


def timm_recorded_heads(args: Dict[str, Any], path: Optional[str]) -> Optional[int]:
    """The head count a timm directory's ``model_args`` records (None: not recorded)."""
    recorded = args.get("num_heads")
    if recorded is not None and type(recorded) is not int:
        raise MappingError(f"config.json: num_heads {recorded!r} is not an integer", path)
    return recorded


#: timm's ``VisionTransformer`` and ``NaFlexVit``: whether pooling takes the prefix tokens too
#: (``pool_include_prefix``, default False), recorded for attention-pooling models only: with
#: ``global_pool='avg'`` it would make the mean include them, which the canonical model does not.
TIMM_MAP_PREFIX = Carry("map_prefix", key="model_args.pool_include_prefix", argument="pool_include_prefix",
                        default=lambda c: c.classifier != "map" or not c.num_prefix_tokens,
                        written=When("classifier", "==", "map"))
#: timm's pooling types vitconv computes (``global_pool``; '' returns every token, 'avgmax' and
#: 'max' reduce otherwise).
TIMM_POOLS = {"token": "token", "avg": "gap", "map": "map"}
#: canonical classifier -> the ``global_pool`` timm's constructors take for it.
TIMM_GLOBAL_POOL = {v: k for k, v in TIMM_POOLS.items()}


def _timm_pool_implied(cfg: ViTConfig) -> str:
    """The pooling timm's defaults give a model with ``cfg``'s tensors: what they show, else
    ``global_pool='token'``."""
    shown = cfg.classifier == "map" or not cfg.class_token or cfg.final_norm == "pooled"
    return cfg.classifier if shown else "token"


def timm_pool_carry(cls_key: str, key: Optional[str]) -> Carry:
    """timm's ``global_pool`` (``VisionTransformer``, ``NaFlexVit``; ``cls_key``: where the class
    token is). The tensors show an attention pool, a mean where there is no class token, and a
    mean normalised after pooling (``fc_norm``); a class token without ``fc_norm`` is 'token' or
    'avg' with ``fc_norm=False``, which only the argument says (``key``: a directory's ``model_args``)."""
    return Carry("classifier", values=tuple(TIMM_GLOBAL_POOL), key=key, argument="global_pool",
                 default=_timm_pool_implied, spelling=TIMM_GLOBAL_POOL,
                 shaped=lambda shapes: (cls_key not in shapes or "fc_norm.weight" in shapes
                                        or "attn_pool.latent" in shapes))


def timm_pooling(shapes: Mapping[str, Tuple[int, ...]], args: Mapping[str, Any], cls_key: str,
                 path: Optional[str]) -> str:
    """The canonical classifier of a timm file (see :func:`timm_pool_carry`): what its tensors
    show, else its ``model_args``' ``global_pool``, else timm's 'token'. A ``global_pool`` the
    tensors contradict, or one vitconv does not compute, is refused naming it."""
    pool = args.get("global_pool")
    if pool is not None and (not isinstance(pool, str) or pool not in TIMM_POOLS):
        raise MappingError(f"config.json: global_pool {pool!r}: vitconv computes "
                           f"{', '.join(map(repr, TIMM_POOLS))} pooling", path)
    if "attn_pool.latent" in shapes:
        classifier, shown = "map", "have an attention-pooling head"
    elif "fc_norm.weight" in shapes:  # timm's fc_norm=True with 'token' pools first: not read yet
        classifier, shown = "gap", "have fc_norm, which vitconv reads with global_pool='avg' only"
    elif cls_key not in shapes:
        classifier, shown = "gap", "have no class token"
    else:
        classifier, shown = (TIMM_POOLS[pool] if pool else "token"), "lack an attention-pooling head"
    if pool is not None and TIMM_POOLS[pool] != classifier:
        raise MappingError(f"config.json says global_pool={pool!r} but the weights {shown}", path)
    return classifier


def timm_map_prefix(args: Mapping[str, Any], classifier: str, prefix: int, path: Optional[str]) -> bool:
    """``map_prefix`` of a timm model whose tensors show ``classifier`` (:func:`timm_pooling`) and
    ``prefix`` prefix tokens, from its ``model_args`` (``pool_include_prefix``; timm's default
    where it is silent); a mean over the prefix tokens too is refused, naming the argument."""
    include = False
    if "pool_include_prefix" in args:
        include = TIMM_MAP_PREFIX.decode(args["pool_include_prefix"], "model_args.pool_include_prefix", path)
    if include and prefix and classifier == "gap":
        raise MappingError("config.json: pool_include_prefix=True with global_pool='avg' (the mean over the "
                           "prefix tokens too): vitconv does not compute this pooling yet", path)
    return include or classifier != "map" or not prefix


def timm_named_arch(probe: Probe) -> Optional[str]:
    """The timm architecture a directory's ``config.json`` names (the hub's seldom lists its
    arguments: what the name implies comes from :mod:`vitconv.archs`)."""
    name = config_json(probe).get("architecture")
    return name if isinstance(name, str) else None


def timm_directory_config(cfg: ViTConfig, usage: Any, architecture: str, model_args: Dict[str, Any],
                          first_conv: str = "patch_embed.proj", classifier: Any = "head") -> Dict[str, Any]:
    """``config.json`` of a timm model directory (the Hugging Face Hub layout timm writes with
    ``push_to_hf_hub``), so ``timm.create_model('local-dir:DIR', pretrained=True)`` builds
    ``architecture`` with ``model_args`` and loads ``model.safetensors``. ``pretrained_cfg`` holds
    the model's preprocessing and class names when known (``usage``)."""
    pretrained: Dict[str, Any] = {"input_size": [cfg.in_chans, cfg.image_size, cfg.image_size],
                                  "num_classes": cfg.num_classes, "first_conv": first_conv, "classifier": classifier}
    if usage is not None:
        pretrained.update(usage.preprocessing.timm_cfg())
        if usage.labels:
            pretrained["label_names"] = list(usage.labels)
    return {"architecture": architecture, "num_classes": cfg.num_classes, "num_features": cfg.width,
            "model_args": model_args, "pretrained_cfg": pretrained}


def build(probe: Probe, **kwargs: Any) -> ViTConfig:
    """``ViTConfig(**kwargs)``, a contradiction among the inferred values named as a mapping error."""
    try:
        return ViTConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise MappingError(f"inconsistent architecture: {e}", probe.path) from None


def prefix_holding(keys: Sequence[str], prefixes: Sequence[str], anchor: str, what: str,
                   path: Optional[str]) -> str:
    """The first of ``prefixes`` under which ``anchor`` is a key (where a file nests its model)."""
    for p in prefixes:
        if p + anchor in keys:
            return p
    places = ", ".join(repr(p) for p in prefixes if p)
    raise MappingError(f"not a {what} checkpoint: no {anchor!r} (nor under {places})", path)


def patch_from_columns(columns: int, patch: Any, channels: Any, key: str, path: Optional[str],
                       default_channels: int = 3) -> Tuple[int, int]:
    """``(patch, channels)`` of a patch projection stored as a Linear over flattened patches
    (``columns = p*p*C``: one number for two fields). A ``config.json``'s ``patch_size`` /
    ``num_channels`` where given (``None`` otherwise), else ``default_channels`` channels and the
    square patch they leave."""
    for name, v in (("patch_size", patch), ("num_channels", channels)):
        if v is not None and (type(v) is not int or v <= 0):
            raise MappingError(f"config.json: {name} {v!r} is not a positive integer", path)
    if patch is not None:
        if columns % (patch * patch) or (channels is not None and channels * patch * patch != columns):
            raise MappingError(f"{key} has {columns} columns, not patch_size {patch} squared times "
                               f"{channels if channels is not None else 'some number of'} channels", path)
        return patch, columns // (patch * patch)
    c = channels if channels is not None else default_channels
    p = int(round((columns / c) ** 0.5)) if columns % c == 0 else 0
    if p <= 0 or c * p * p != columns:
        raise MappingError(f"{key} has {columns} columns, which is not {c} channels times a square patch", path)
    return p, c
