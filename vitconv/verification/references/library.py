"""The source library's own model as ``verify``'s reference, for sources that are not Google
``.npz`` files (those have the independent NumPy reference, :mod:`vitconv.verification.references.google_numpy`).

A Hugging Face directory is loaded with ``transformers``' ``from_pretrained`` and a timm
directory with ``timm.create_model('local-dir:…')``: both from the files alone, so nothing of
vitconv's reading enters the reference. A bare state dict (timm, the original DINOv2, OpenAI
CLIP / OpenCLIP) records no constructor arguments: the library's class is built with the
arguments vitconv read off the file and loads it strictly, which checks every name and shape
but takes the semantics the file does not record (activation, epsilon) from vitconv, as the
report says.

Stages, where the library exposes them: ``embed`` (the tokens entering block 0), each block's
output (``blocks.{i}.mlp``) and the final output (``logits``: logits, or the embedding a
headless model returns). The libraries are optional dependencies, imported here only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from vitconv.archs.generate import import_timm
from vitconv.errors import BadInputError, first_line
from vitconv.conversion.pipeline import Checkpoint
from vitconv.layouts import timm_eva
from vitconv.layouts.timm import architecture, model_args
from vitconv.layouts.timm_beit import model_args as beit_args
from vitconv.layouts.timm_naflexvit import model_args as naflex_args
from vitconv.formats.hf_dir import CONFIG_JSON
from vitconv.formats.open import open_source

#: Hugging Face layout -> (transformers class, how its output gives the model's final output)
HF_CLASSES = {"hf": ("ViTForImageClassification", "logits"), "hf_model": ("ViTModel", "pooler"),
              "hf_dinov2": ("Dinov2Model", "pooler_output"), "hf_dinov2_reg": ("Dinov2WithRegistersModel", "pooler_output"),
              "hf_clip": ("CLIPVisionModel", "pooler_output"), "hf_clip_proj": ("CLIPVisionModelWithProjection",
                                                                              "image_embeds"),
              "hf_siglip": ("SiglipVisionModel", "pooler_output"), "hf_dinov3": ("DINOv3ViTModel", "pooler_output"),
              "hf_aimv2": ("Aimv2VisionModel", "aimv2"),
              "hf_beit": ("BeitModel", "pooler_output"), "hf_beit_cls": ("BeitForImageClassification", "logits"),
              "hf_data2vec_vision": ("Data2VecVisionModel", "pooler_output"),
              "hf_data2vec_vision_cls": ("Data2VecVisionForImageClassification", "logits")}
LAYOUTS = tuple(HF_CLASSES) + ("hf_siglip2", "timm", "timm_beit", "timm_eva", "timm_naflexvit", "dinov2", "clip",
                               "dinov3_original")


class LibraryMissing(BadInputError):
    """The source's library is not installed: no reference can run (``golden`` notes it)."""


class LibraryReference:
    """``forward_stages(images_nhwc) -> {stage: array}`` through the library's model, in float32
    whatever dtype the file stores (a bfloat16 release's reference would otherwise round every
    layer, and a conversion that is exact would fail by bfloat16's rounding)."""

    reference_dtype = "float32"

    def __init__(self, description: str, cfg, run: Callable, fixed_size: bool = False,
                 streamed: "Optional[BlockStreamer]" = None):
        self.description = f"{description}, run in float32" + (", block by block" if streamed else "")
        self.image_size, self.stride, self.in_chans = cfg.image_size, cfg.total_stride, cfg.in_chans
        self.fixed_size = fixed_size  # the library runs at the checkpoint's resolution only
        self.streamed = streamed  # None: the whole model is in memory
        self._run = streamed.wrap(run) if streamed else run

    def forward_stages(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
        with torch.no_grad():
            return {k: v.detach().float().numpy() for k, v in self._run(x).items()}


def _import(name: str, path, module: str = "", pip: str = ""):
    """``module`` (default: the package ``name``), or :class:`LibraryMissing` naming the fix.
    timm is imported with a placeholder for torchvision where none is installed (its model code
    never uses it; its package imports do, and torchvision has no CPU wheel for every torch)."""
    try:
        if name == "timm":
            import_timm()
        return importlib.import_module(module or name)
    except Exception as e:
        fix = f"pip install {pip or name}" if getattr(e, "name", None) == name else "install what it needs"
        raise LibraryMissing(f"the reference is the source's own library, {name}, and it is not importable "
                             f"here ({first_line(e)}): {fix}", path) from None


@contextlib.contextmanager
def _quiet(transformers):
    """No loading progress bar on the user's terminal; the setting is restored after."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


@contextlib.contextmanager
def _capture(blocks: List, blocks_first: bool = False):
    """Block outputs (and the input of the first block, the embedding) through hooks."""
    out: Dict[str, object] = {}
    handles = []

    def keep(name, transpose):
        return lambda module, args, result: out.__setitem__(name, result.transpose(0, 1) if transpose else result)

    handles.append(blocks[0].register_forward_pre_hook(
        lambda module, args: out.__setitem__("embed", args[0].transpose(0, 1) if blocks_first else args[0])))
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(keep(f"blocks.{i}.mlp", blocks_first)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _load_strict(model, ckpt: Checkpoint, path):
    """The file's tensors into the library's model, every name and shape checked."""
    import torch

    src, prefix = ckpt.source, ckpt.prefix
    state = {k[len(prefix):]: torch.from_numpy(np.ascontiguousarray(src.get(k))) for k in src.keys()
             if k.startswith(prefix) and k not in ckpt.ignored}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BadInputError(f"the library's model does not take this file as vitconv read it "
                            f"({first_line(e)})", path) from None
    return model.eval().float()


# --------------------------------------------------------------------------- block by block
#: Library references run block by block (their stages equal the whole model's to the bit, and
#: they are no slower: ``tests/test_library_streamed.py``, BENCHMARKS.md); False: the whole model.
STREAM_BLOCKS = True


@contextlib.contextmanager
def _meta_parameters():
    """Every parameter a module registers goes to the ``meta`` device (no memory, no values);
    buffers stay real: the tables and ids a library computes in ``__init__`` (rotary periods,
    ``position_ids``) are its own, not the file's, and a ``meta`` build would lose them."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _block_list(model, depth: int) -> Optional[List]:
    """The ``ModuleList`` (timm: ``Sequential``) of ``depth`` blocks holding most of ``model``'s parameters."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m) == depth]
    if not lists:
        return None
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


class BlockStreamer:
    """A library model built with its parameters on ``meta`` (:func:`_meta_parameters`) run on
    the file's tensors one block at a time: before each pass everything outside the blocks is
    read (embedding, final norm, heads); a forward pre-hook reads a block's tensors as the pass
    reaches it and a forward hook sends them back to ``meta`` once it has run. The library's
    modules run the same operations on the same float32 values as the whole model's, so the
    stages are equal to the bit; the peak is one block's weights (what lets ``verify`` of a
    library layout run a model larger than memory). ``keys``: the model's state name -> the
    file's key; the file is opened again for each pass (``path``)."""

    def __init__(self, model, blocks: List, path, keys: Dict[str, str]):
        self.model, self.blocks, self._path, self._keys = model, blocks, path, keys
        where = {id(m): n for n, m in model.named_modules()}
        names = [where[id(b)] + "." for b in blocks]
        self.inside = [[k for k in keys if k.startswith(n)] for n in names]
        self.outside = [k for k in keys if not any(k.startswith(n) for n in names)]

    def _assign(self, names: List[str], source) -> None:
        import torch

        for name in names:
            module, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(module)
            old = owner._parameters.get(leaf)
            if old is None:
                old = owner._buffers[leaf]
            t = torch.from_numpy(np.ascontiguousarray(source.get(self._keys[name]))).to(old.dtype)
            if leaf in owner._parameters:  # requires_grad as built: torch.nn.MultiheadAttention rounds
                # differently without it (a SigLIP head, by 2e-6)
                owner._parameters[leaf] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                owner._buffers[leaf] = t

    def _release(self, names: List[str]) -> None:
        import torch

        for name in names:
            module, _, leaf = name.rpartition(".")
            owner = self.model.get_submodule(module)
            if leaf in owner._parameters:
                p = owner._parameters[leaf]
                owner._parameters[leaf] = torch.nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            else:
                owner._buffers[leaf] = owner._buffers[leaf].to("meta")

    def wrap(self, run: Callable) -> Callable:
        """``run`` (the whole model's pass) with the weights read as the pass needs them."""
        def streamed(x):
            handles = []
            with open_source(self._path) as source:
                try:
                    self._assign(self.outside, source)
                    for i, block in enumerate(self.blocks):
                        handles.append(block.register_forward_pre_hook(
                            lambda module, args, i=i: self._assign(self.inside[i], source)))
                        handles.append(block.register_forward_hook(
                            lambda module, args, out, i=i: self._release(self.inside[i])))
                    return run(x)
                finally:
                    for h in handles:
                        h.remove()
                    self._release(list(self._keys))
        return streamed


def _shapes_agree(model, keys: Dict[str, str], source) -> bool:
    state = model.state_dict(keep_vars=True)
    return all(tuple(state[k].shape) == tuple(source.shape(f)) for k, f in keys.items())


def _streamer(model, ckpt: Checkpoint, path, depth: int, keys: Dict[str, str]) -> Optional[BlockStreamer]:
    """A :class:`BlockStreamer` for ``model`` (parameters on ``meta``) over the file's tensors
    ``keys`` (every state name of the model mapped), or None where the names or shapes do not
    all agree or no block list is found (the whole-model load then runs, and says what is wrong)."""
    blocks = _block_list(model, depth)
    if blocks is None or set(keys) != set(model.state_dict()) or not _shapes_agree(model, keys, ckpt.source):
        return None
    return BlockStreamer(model.eval().float(), blocks, path, keys)


def _strict_keys(model, ckpt: Checkpoint) -> Dict[str, str]:
    """The model's state names -> the file's keys, as :func:`_load_strict` pairs them."""
    prefix = ckpt.prefix
    return {k[len(prefix):]: k for k in ckpt.source.keys() if k.startswith(prefix) and k not in ckpt.ignored}


def _built(build: Callable, ckpt: Checkpoint, path, stream: bool):
    """``(model, streamer)``: ``build()``'s model with its parameters on ``meta`` and the
    streamer that reads them block by block, or (without ``stream``, or where the file does
    not pair with the model name for name and shape) the whole model loaded strictly and None."""
    if stream:
        with _meta_parameters():
            model = build()
        streamer = _streamer(model, ckpt, path, ckpt.source_config.depth, _strict_keys(model, ckpt))
        if streamer is not None:
            return model, streamer
    return _load_strict(build(), ckpt, path), None


def _hooked(model, blocks, blocks_first=False) -> Callable:
    """``model(x)`` as the final output, with the embedding and block outputs from hooks."""
    def run(x):
        with _capture(blocks, blocks_first=blocks_first) as out:
            out["logits"] = model(x)
        return out
    return run


def _same_keys(model, ckpt: Checkpoint) -> Dict[str, str]:
    """The model's state names found under the same name in the file (a timm directory)."""
    have = set(ckpt.source.keys())
    return {k: k for k in model.state_dict() if k in have}


def _hf_keys(model, ckpt: Checkpoint) -> Dict[str, str]:
    """The model's state names -> the directory's keys, as ``from_pretrained`` renames them
    (transformers' own renaming table: ``attention.attention.query`` -> ``q_proj``, ``gamma`` ->
    ``weight``, the base model's prefix added or taken away). Empty where one of the file's
    keys needs a conversion that is more than a new name (fused or split tensors), or where
    transformers has no such table (before 5.0: the whole model is loaded then)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:
        return {}

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state, keys = model.state_dict(), {}
    for f in ckpt.source.keys():
        k, converted = rename_source_key(f, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            return {}
        if k in state:
            keys.setdefault(k, f)
    return keys


def _from_pretrained(transformers, cls: str, src, ckpt: Checkpoint, stream: bool, **kwargs):
    """``(model, streamer)``: the transformers class built from the directory's config with its
    parameters on ``meta`` and read block by block, or (without ``stream``, or where a name
    or shape does not pair) ``from_pretrained``'s whole model and None. float32 whatever the
    weights are stored as: transformers would keep a bfloat16 file's dtype."""
    import torch

    klass = getattr(transformers, cls)
    if stream:
        try:
            with _quiet(transformers):
                config = klass.config_class.from_pretrained(Path(src))
                with _meta_parameters():
                    model = klass._from_config(config, dtype=torch.float32, **kwargs)
        except Exception:  # from_pretrained below says what is wrong
            model = None
        streamer = model is not None and _streamer(model, ckpt, src, ckpt.source_config.depth, _hf_keys(model, ckpt))
        if streamer:
            return model, streamer
    try:
        with _quiet(transformers):
            model = klass.from_pretrained(Path(src), dtype=torch.float32, **kwargs).eval().float()
    except Exception as e:  # the library's own loader refuses the directory
        raise BadInputError(f"{cls}.from_pretrained refuses it ({first_line(e)})", src) from None
    return model, None


def _hugging_face(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    layout, cfg = ckpt.layout.name, ckpt.source_config
    transformers = _import("transformers", src)
    cls, output = HF_CLASSES[layout]
    if not directory:
        raise BadInputError(f"verify loads a Hugging Face source with {cls}.from_pretrained: give the "
                            "model directory (config.json beside the weights)", src)
    # BEiT's model classes: with the pooler exactly where the file has its norm (a mean-pooling
    # model without one has no final norm: from_pretrained would make a fresh one)
    pooler = {"add_pooling_layer": cfg.final_norm != "none"} if cls in ("BeitModel", "Data2VecVisionModel") else {}
    if layout == "hf_clip_proj":  # a CLIPModel's config.json holds projection_dim outside its vision_config
        pooler["projection_dim"] = cfg.num_classes
    model, streamed = _from_pretrained(transformers, cls, src, ckpt, stream, **pooler)
    own = cfg.image_size  # DINOv2 always resizes its table; the others when asked to; Aimv2 never (a native
    # one generates its table for any grid)

    def run(x):
        resize = ({} if layout.startswith(("hf_dinov2", "hf_dinov3")) or layout == "hf_aimv2" or x.shape[-1] == own
                  else {"interpolate_pos_encoding": True})  # DINOv3: rotary, computed for any grid; AIMv2: never
        o = model(pixel_values=x, output_hidden_states=True, **resize)
        stages = {"embed": o.hidden_states[0], **{f"blocks.{i}.mlp": h for i, h in enumerate(o.hidden_states[1:])}}
        if output == "pooler":  # ViTModel: its tanh pooler is Google's pre_logits, else the normed class token
            stages["logits"] = o.pooler_output if o.pooler_output is not None else o.last_hidden_state[:, 0]
        elif output == "aimv2":  # its attention head, or without one timm's AIMv2 pooling (the tokens' mean)
            stages["logits"] = o.pooler_output if o.pooler_output is not None else o.last_hidden_state.mean(1)
        elif output == "pooler_output" and o.pooler_output is None:  # BEiT without its pooler: no norm
            stages["logits"] = o.last_hidden_state[:, 1:].mean(dim=1)
        else:
            stages["logits"] = getattr(o, output)
        return stages
    return LibraryReference(f"transformers {cls}.from_pretrained", cfg, run, streamed=streamed,
                            fixed_size=layout == "hf_aimv2" and not model.config.is_native)


def _timm_beit(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    """timm's ``Beit`` built with the arguments vitconv read; it has no dynamic input size (at
    another one timm builds a model for it and resizes the tables as it loads them)."""
    cfg = ckpt.source_config
    beit = _import("timm", src, "timm.models.beit")
    import torch

    model, streamed = _built(lambda: beit.Beit(**beit_args(cfg), norm_layer=partial(torch.nn.LayerNorm,
                                                                                  eps=cfg.norm_eps)),
                             ckpt, src, stream)
    return LibraryReference("timm's Beit, built with the arguments vitconv read (the file records none)", cfg,
                            _hooked(model, list(model.blocks)), fixed_size=True, streamed=streamed)


def _naflex_patches(x, patch: int):
    """NCHW images as NaFlex patches ``(B, rows*cols, p*p*C)``, each flattened (row, column,
    channel) as ``Siglip2ImageProcessor`` and timm's ``batch_patchify`` lay them out, and the grid."""
    b, c, h, w = x.shape
    rows, cols = h // patch, w // patch
    patches = x.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, -1)
    return patches, rows, cols


def _siglip2(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    """``Siglip2VisionModel.from_pretrained`` on the image's patches, no padding: every slot valid,
    ``spatial_shapes`` the image's grid, so transformers resizes the table its own way."""
    cfg = ckpt.source_config
    transformers = _import("transformers", src)
    if not directory:
        raise BadInputError("verify loads a Hugging Face source with Siglip2VisionModel.from_pretrained: give "
                            "the model directory (config.json beside the weights)", src)
    import torch

    model, streamed = _from_pretrained(transformers, "Siglip2VisionModel", src, ckpt, stream)

    def run(x):
        patches, rows, cols = _naflex_patches(x, cfg.patch_size)
        mask = torch.ones(patches.shape[:2], dtype=torch.long)
        shapes = torch.tensor([[rows, cols]] * x.shape[0])
        o = model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True)
        return {"embed": o.hidden_states[0], **{f"blocks.{i}.mlp": h for i, h in enumerate(o.hidden_states[1:])},
                "logits": o.pooler_output}
    return LibraryReference("transformers Siglip2VisionModel.from_pretrained (NaFlex patches)", cfg, run,
                            streamed=streamed)


def _naflexvit(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    """timm's ``NaFlexVit`` built with the arguments vitconv read (a bare state dict records none),
    run on the images themselves: timm patchifies and resizes its grid its own way."""
    cfg = ckpt.source_config
    _import("timm", src)
    import torch
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    args = {k: tuple(v) if isinstance(v, list) else v for k, v in naflex_args(cfg).items()
            if k not in ("in_chans", "num_classes")}  # what a timm directory of it would record
    nf = NaFlexVitCfg(**args, norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps))
    model, streamed = _built(lambda: NaFlexVit(nf, in_chans=cfg.in_chans, num_classes=cfg.num_classes), ckpt, src,
                             stream)
    return LibraryReference("timm NaFlexVit, built with the arguments vitconv read (the file records none)", cfg,
                            _hooked(model, list(model.blocks)), streamed=streamed)


def _timm_dir(timm, path: Path, ckpt: Checkpoint, stream: bool, **kwargs):
    """``(model, streamer)`` of ``timm.create_model('local-dir:…')``: built from the directory's
    config with its parameters on ``meta`` and read block by block, or (without ``stream``, or
    where a name or shape does not pair) loaded whole by timm, and None."""
    if stream:
        try:
            with _meta_parameters():
                model = timm.create_model(f"local-dir:{path}", pretrained=False, **kwargs)
        except Exception:  # the whole load below says what is wrong
            model = None
        streamer = model is not None and _streamer(model, ckpt, path, ckpt.source_config.depth, _same_keys(model, ckpt))
        if streamer:
            return model, streamer
    try:
        return timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs).eval().float(), None
    except Exception as e:
        raise BadInputError(f"timm.create_model('local-dir:…') refuses it ({first_line(e)})", path) from None


def _timm(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    cfg, path = ckpt.source_config, Path(src)
    timm = _import("timm", src)
    if directory and "architecture" in ckpt.source.documents.get(CONFIG_JSON, {}):
        model, streamed = _timm_dir(timm, path, ckpt, stream, dynamic_img_size=True)
        how = "timm.create_model('local-dir:…')"
    else:
        import torch

        norm = partial(timm.layers.RmsNorm if cfg.norm == "rmsnorm" else torch.nn.LayerNorm, eps=cfg.norm_eps)
        kw = dict(model_args(cfg), norm_layer=norm, dynamic_img_size=True)
        if cfg.patch_embed_norm:  # AIMv2: the patch embedding's own norm, of the same kind
            kw["embed_norm_layer"] = norm
        model, streamed = _built(lambda: timm.create_model(architecture(cfg), pretrained=False, **kw), ckpt, src, stream)
        how = "timm, built with the arguments vitconv read (the file records none)"
    return LibraryReference(how, cfg, _hooked(model, list(model.blocks)), streamed=streamed)


def _timm_eva(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    """timm's ``Eva`` (DINOv3): a timm directory through ``create_model('local-dir:…')``, a bare
    state dict built with the arguments vitconv read (rope_type, rope_temperature, pooling, eps:
    the file records none) and loaded strictly."""
    cfg, path = ckpt.source_config, Path(src)
    timm = _import("timm", src)
    if directory and "architecture" in ckpt.source.documents.get(CONFIG_JSON, {}):
        model, streamed = _timm_dir(timm, path, ckpt, stream)
        how = "timm.create_model('local-dir:…')"
    else:
        import torch

        kw = dict(timm_eva.model_args(cfg), norm_layer=partial(torch.nn.LayerNorm, eps=cfg.norm_eps))
        model, streamed = _built(lambda: timm.create_model(timm_eva.architecture(cfg), pretrained=False, **kw), ckpt,
                                 src, stream)
        how = "timm Eva, built with the arguments vitconv read (the file records none)"
    return LibraryReference(how, cfg, _hooked(model, list(model.blocks)), streamed=streamed)


def _dinov2(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    cfg = ckpt.source_config
    _import("dinov2", src)
    from dinov2.layers import MemEffAttention
    from dinov2.layers import NestedTensorBlock as Block
    from dinov2.models.vision_transformer import DinoVisionTransformer

    kw = {"ffn_layer": "swiglufused"} if cfg.mlp == "swiglu" else {"mlp_ratio": cfg.mlp_dim / cfg.width}
    if cfg.num_reg_tokens:  # releases after April 2023
        if "num_register_tokens" not in inspect.signature(DinoVisionTransformer).parameters:
            raise BadInputError("verify runs the installed dinov2 code as the reference and it predates "
                                "register tokens: install DINOv2 from its repository", src)
        kw.update(num_register_tokens=cfg.num_reg_tokens, interpolate_antialias=True, interpolate_offset=0.0)
    model, streamed = _built(lambda: DinoVisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
        num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias, init_values=1.0, block_chunks=0,
        block_fn=partial(Block, attn_class=MemEffAttention), **kw), ckpt, src, stream)
    return LibraryReference("the original DINOv2 DinoVisionTransformer, built with the arguments vitconv read",
                            cfg, _hooked(model, list(model.blocks)), streamed=streamed)


def _clip(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    """OpenAI's ``clip/model.py`` where it computes the tower (QuickGELU, ``ln_pre``, class
    token, no LayerScale), else OpenCLIP's ``VisionTransformer``. Neither resizes its table."""
    cfg = ckpt.source_config
    if not cfg.num_classes:
        raise BadInputError("verify builds the CLIP tower with its projection (proj): this file has none", src)
    if cfg.act == "quick_gelu" and not cfg.layer_scale and cfg.norm_pre and cfg.classifier == "token":
        spec = importlib.util.find_spec("clip")  # the model file alone: clip/__init__ needs torchvision
        if spec is None:
            raise LibraryMissing("the reference is OpenAI's clip/model.py and it is not importable here: "
                                 "pip install clip-anytorch", src)
        mspec = importlib.util.spec_from_file_location(
            "_vitconv_openai_clip_model", os.path.join(spec.submodule_search_locations[0], "model.py"))
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        model, streamed = _built(lambda: module.VisionTransformer(
            input_resolution=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.depth,
            heads=cfg.num_heads, output_dim=cfg.num_classes), ckpt, src, stream)
        return LibraryReference("OpenAI's clip/model.py VisionTransformer, built with the arguments vitconv read",
                                cfg, _hooked(model, list(model.transformer.resblocks), blocks_first=True),
                                fixed_size=True, streamed=streamed)
    oct = _import("open_clip", src, "open_clip.transformer", "open-clip-torch")
    if cfg.act not in ("gelu", "quick_gelu") or cfg.classifier not in ("token", "gap"):
        raise BadInputError(f"OpenCLIP's VisionTransformer computes GELU or QuickGELU with class-token or "
                            f"mean pooling, not act={cfg.act!r} classifier={cfg.classifier!r}", src)
    import torch

    model, streamed = _built(lambda: oct.VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.depth,
        heads=cfg.num_heads, mlp_ratio=cfg.mlp_dim / cfg.width, ls_init_value=1.0 if cfg.layer_scale else None,
        output_dim=cfg.num_classes, no_ln_pre=not cfg.norm_pre, pool_type="tok" if cfg.classifier == "token" else "avg",
        final_ln_after_pool=cfg.final_norm == "pooled",
        act_layer=oct.QuickGELU if cfg.act == "quick_gelu" else torch.nn.GELU,
        norm_layer=partial(oct.LayerNorm, eps=cfg.norm_eps)), ckpt, src, stream)
    blocks_first = not getattr(model.transformer, "batch_first", True)
    return LibraryReference("OpenCLIP's VisionTransformer, built with the arguments vitconv read", cfg,
                            _hooked(model, list(model.transformer.resblocks), blocks_first=blocks_first),
                            fixed_size=True, streamed=streamed)


def _dinov3(src, ckpt: Checkpoint, directory: bool, stream: bool) -> LibraryReference:
    """The original DINOv3 ``DinoVisionTransformer`` (``facebookresearch/dinov3``, not on PyPI),
    built as the hub's constructors build it (``pos_embed_rope_dtype='fp32'``: float32 arithmetic
    on the periods as loaded) with the arguments vitconv read, and loaded strictly, the stored
    ``rope_embed.periods`` included. Its blocks take and return lists of token tensors (its
    multi-crop path), so only the final output (the normed class token) is compared. Built whole
    (``stream`` is not taken): the package is not installed where the block-by-block path is tested."""
    cfg = ckpt.source_config
    _import("dinov3", src, "dinov3.models.vision_transformer", pip="git+https://github.com/facebookresearch/dinov3")
    from dinov3.models.vision_transformer import DinoVisionTransformer

    # SwiGLUFFN's width: int(int(width * ffn_ratio) * 2 / 3), rounded up to 8
    ffn = (dict(ffn_layer="swiglu", ffn_ratio=1.5 * cfg.mlp_dim / cfg.width) if cfg.mlp == "swiglu"
           else dict(ffn_layer="mlp", ffn_ratio=cfg.mlp_dim / cfg.width))
    model = DinoVisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, pos_embed_rope_base=cfg.rope_theta,
        pos_embed_rope_normalize_coords="separate", pos_embed_rope_dtype="fp32", embed_dim=cfg.width,
        depth=cfg.depth, num_heads=cfg.num_heads, qkv_bias=cfg.qkv_bias,
        layerscale_init=1.0 if cfg.layer_scale else None,
        norm_layer="layernormbf16" if cfg.norm_eps == 1e-5 else "layernorm", ffn_bias=cfg.mlp_bias,
        proj_bias=cfg.proj_bias, n_storage_tokens=cfg.num_reg_tokens, mask_k_bias=not cfg.key_bias, **ffn)
    _load_strict(model, ckpt, src)
    return LibraryReference("the original DINOv3 DinoVisionTransformer, built with the arguments vitconv read",
                            cfg, lambda x: {"logits": model(x)})


_BUILDERS = {**{name: _hugging_face for name in HF_CLASSES}, "hf_siglip2": _siglip2, "timm": _timm,
             "timm_beit": _timm_beit, "timm_eva": _timm_eva, "timm_naflexvit": _naflexvit, "dinov2": _dinov2,
             "clip": _clip, "dinov3_original": _dinov3}


def open_reference(src: os.PathLike | str, ckpt: Checkpoint, stream: Optional[bool] = None) -> LibraryReference:
    """The library model of ``src`` (already opened as ``ckpt``), or a one-line error saying why not.
    ``stream`` (default :data:`STREAM_BLOCKS`): built on ``meta`` and run block by block from the
    file (:class:`BlockStreamer`), where the library's names pair with the file's; False: whole."""
    build = _BUILDERS.get(ckpt.layout.name)
    if build is None:
        raise BadInputError(f"verify has no reference for the {ckpt.layout.name} layout (references: Google "
                            f".npz files and {', '.join(LAYOUTS)} sources)", src)
    path = Path(src)
    return build(src, ckpt, path.is_dir() and (path / "config.json").is_file(),
                 STREAM_BLOCKS if stream is None else stream)
