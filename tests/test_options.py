"""The one frozen options object (:mod:`vitconv.conversion.options`): built once where the
choices are given (a keyword call, a command's flags, a manifest row), handed on whole to
reading, writing and verifying, varied with ``dataclasses.replace``; and the conversion's one
hook, run once every byte is written and before anything is renamed into place."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import vitconv
from _vitconv_cli.main import main
from conftest import CASES, golden_expected, golden_input, golden_path
from vitconv.conversion import pipeline, service
from vitconv.conversion.batch import Row
from vitconv.conversion.options import ConvertOptions, ReadOptions

SRC = golden_path("jax/tiny_token_p8_32.npz")


def _logits(path) -> np.ndarray:
    with torch.no_grad():
        return vitconv.load(path)(golden_input(CASES["tiny_token_p8_32_to_48"])).numpy()


def test_options_are_frozen_and_hold_no_reference_to_what_the_caller_keeps_changing():
    told = {"act": "gelu"}
    labels = ["a", "b"]
    options = ConvertOptions(overrides=told, labels=labels, require_layout="google", metadata={"mine": "x"})
    told["act"], labels[0] = "quick_gelu", "z"  # the caller's own objects, changed afterwards
    assert dict(options.overrides) == {"act": "gelu"} and options.labels == ("a", "b")
    assert options.require_layout == ("google",) and options.metadata.other == {"mine": "x"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.image_size = 48  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.overrides["act"] = "relu"  # type: ignore[index]
    variant = dataclasses.replace(options, image_size=48)
    assert (variant.image_size, options.image_size) == (48, None) and variant.overrides == options.overrides
    assert variant.reading() == ReadOptions(image_size=48, overrides={"act": "gelu"}, labels=("a", "b"),
                                            require_layout=("google",))
    assert ConvertOptions.of(ReadOptions(image_size=48, dtype="float32"), dtype="float16", to="timm") == \
        ConvertOptions(image_size=48, dtype="float16", to="timm")


@pytest.mark.parametrize("how", ["keywords", "options", "replace"])
def test_every_front_door_reads_googles_resize(how, tmp_path):
    """``vitconv.convert``'s keywords, a ConvertOptions handed whole and a replaced variant each
    reach the reader: the output computes Google's own 32 -> 48 px logits (vit_jax, golden)."""
    out = tmp_path / "x.safetensors"
    if how == "keywords":
        vitconv.convert(SRC, out, image_size=48, hash_source=False)
    elif how == "options":
        pipeline.convert(SRC, out, ConvertOptions(image_size=48, hash_source=False))
    else:
        service.convert(SRC, out, dataclasses.replace(ConvertOptions(hash_source=False), image_size=48))
    want = golden_expected(CASES["tiny_token_p8_32_to_48"], "logits")
    assert np.abs(_logits(out) - want).max() <= 2e-5
    with vitconv.open_checkpoint(SRC, image_size=48) as ckpt:  # the reader's keywords, kept
        assert ckpt.config.image_size == 48 and ckpt.resized_from == 4
    with pytest.raises(TypeError, match="imagesize"):  # a misspelt option is not silently dropped
        vitconv.convert(SRC, tmp_path / "y.safetensors", imagesize=48)


@pytest.mark.parametrize("dst", ["x.safetensors", "x.pt", "x.npz", "xdir"])
def test_the_one_hook_runs_once_on_the_finished_temporaries_before_the_commit(dst, tmp_path):
    calls = []

    def hook(written: pipeline.Written) -> str:
        calls.append(written)
        assert not (tmp_path / dst).exists()  # nothing renamed into place yet
        assert written.temporaries and all(p.exists() for p in written.temporaries)
        return "figures"

    report = pipeline.convert(SRC, tmp_path / dst, ConvertOptions(), hook)
    assert len(calls) == 1 and report.checked == "figures" and (tmp_path / dst).exists()
    assert calls[0].source_sha256 == hashlib.sha256(SRC.read_bytes()).hexdigest()
    assert calls[0].ckpt.layout.name == "google" and calls[0].container == {"xdir": "dir"}.get(dst, dst[2:])


def test_the_service_runs_a_callers_hook_after_its_own_check(tmp_path):
    """The service's verification, then the caller's hook, both before the commit; a failing hook
    leaves nothing (what ``export --safetensors`` relies on)."""
    seen = []
    report = service.convert(SRC, tmp_path / "ok.safetensors", ConvertOptions(verify=True),
                             hook=lambda w: seen.append(w.temporaries))
    assert seen and report.checked.ok and report.checked.stages  # the service's figures, not the hook's

    def refuse(written: pipeline.Written) -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        service.convert(SRC, tmp_path / "x.safetensors", ConvertOptions(), hook=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]


def test_each_command_builds_the_options_once_from_its_flags(tmp_path, monkeypatch):
    got = []

    def spy(src, dst, options, *, hook=None, progress=None):
        got.append(options)
        raise vitconv.BadInputError("stopped here")

    monkeypatch.setattr(importlib.import_module("_vitconv_cli.convert"), "convert_any", spy)
    monkeypatch.setattr(importlib.import_module("_vitconv_cli.npz2pt"), "convert", spy)
    r = CliRunner().invoke(main, ["convert", str(SRC), str(tmp_path / "t.pth"), "--to", "timm", "--image-size", "48",
                                  "--set", "act=gelu", "--arch", "vit_tiny", "--dtype", "float16", "--verify",
                                  "--num-classes", "3"])
    assert r.exit_code != 0 and "stopped here" in r.output
    r = CliRunner().invoke(main, ["npz2pt", str(SRC), "--patch-size", "4", "--labels", "imagenet-1k"])
    assert r.exit_code != 0 and "stopped here" in r.output
    convert, npz2pt = got
    assert (convert.to, convert.image_size, convert.dtype, convert.verify, convert.num_classes) == \
        ("timm", 48, "float16", True, 3)
    assert dict(convert.overrides) == {"act": "gelu", "arch": "vit_tiny"} and convert.command.startswith("vitconv ")
    assert npz2pt.require_layout == ("google", "big_vision") and npz2pt.patch_size == 4
    assert npz2pt.labels == "imagenet-1k" and not npz2pt.verify


def test_a_manifest_row_is_one_options_object():
    row = Row(line=3, src="a.npz", dst="b.pt", to="timm", image_size=48, dtype="float16", verify=True,
              num_heads=2, labels="imagenet-1k", arch="vit_tiny", set="act=gelu norm_eps=1e-5")
    options = row.converting(source_sha256="ab" * 32, command="vitconv batch m.jsonl (line 3)")
    assert options == ConvertOptions(to="timm", image_size=48, dtype="float16", verify=True, num_heads=2,
                                     labels="imagenet-1k", overrides={"act": "gelu", "norm_eps": 1e-5,
                                                                      "arch": "vit_tiny"},
                                     source_sha256="ab" * 32, command="vitconv batch m.jsonl (line 3)")


def test_export_safetensors_writes_the_bytes_convert_writes(tmp_path):
    """``export --safetensors`` is the convert service with a parity check as its hook: the same
    tensors and header, float16 included."""
    for flags, dtype in (([], None), (["--fp16"], "float16")):
        out = tmp_path / f"e{len(flags)}.safetensors"
        r = CliRunner().invoke(main, ["export", str(SRC), "--safetensors", str(out), *flags])
        assert r.exit_code == 0, r.output
        vitconv.convert(SRC, tmp_path / "c.safetensors", dtype=dtype)
        assert out.read_bytes() == (tmp_path / "c.safetensors").read_bytes()
        want = {k: v.astype(dtype or np.float32) for k, v in np.load(SRC).items()}  # the .npz's own values
        got = load_file(str(out))
        assert got["cls_token"].ravel().tolist() == want["cls"].ravel().tolist()
        (tmp_path / "c.safetensors").unlink()


def test_the_entry_points_take_one_options_object():
    """A new option is a field, not a parameter threaded through every call."""
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(pipeline.open_checkpoint) == ["path", "options", "source"]
    assert params(pipeline.convert) == ["src", "dst", "options", "hook", "progress"]
    assert params(service.convert) == ["src", "dst", "options", "hook", "progress"]
