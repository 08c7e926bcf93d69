"""``verify`` and ``open_predictor`` read with one frozen ``ReadOptions`` (the keywords vary it, as
``vitconv.open_checkpoint`` does), and the ``verify`` / ``predict`` commands build one from their
flags. Judged by Google's NumPy reference of the source (never by the converter): options that
do not reach the reader would give another model, caught where it acts."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import vitconv
from _vitconv_cli.main import main
from conftest import golden_path
from vitconv.conversion.options import ReadOptions
from vitconv.errors import BadInputError
from vitconv.runtime.predict import open_predictor
from vitconv.verification.references.google_numpy import GoogleViTReference
from vitconv.verification.verify import verify

SRC = golden_path("jax/tiny_token_p8_32.npz")
#: what the bare timm file of the tiny model does not record (its heads; its GELU is tanh, timm's exact)
TOLD = ReadOptions(num_heads=3, overrides={"act": "gelu_tanh"})


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    out = tmp_path_factory.mktemp("bare") / "t.pth"
    vitconv.convert(SRC, out, to="timm")
    return out


def test_verify_reads_a_bare_file_with_the_options_given(bare):
    assert verify(SRC, bare, TOLD).ok
    heads_only = verify(SRC, bare, ReadOptions(num_heads=3))  # timm's default GELU: exact, not tanh
    assert heads_only.first_failure.name == "blocks.0.mlp"
    # keywords vary the options given
    assert verify(SRC, bare, ReadOptions(num_heads=3), overrides={"act": "gelu_tanh"}).ok
    assert verify(SRC, bare, TOLD, num_heads=1).first_failure.name == "blocks.0.attn"


def test_verify_tests_at_the_options_image_size():
    report = verify(SRC, None, ReadOptions(image_size=48), batch=1)
    assert report.ok and report.image_size == 48
    assert report.lines()[2].startswith("inputs     1 x 48x48 NHWC")


@pytest.mark.parametrize("given, named", [(dict(dtype="float16"), "dtype"), (dict(patch_size=4), "patch_size"),
                                          (dict(num_classes=3, labels=("a", "b", "c")), "labels, num_classes")])
def test_verify_refuses_a_field_it_cannot_follow(given, named):
    with pytest.raises(BadInputError) as e:
        verify(SRC, None, ReadOptions(**given))
    assert str(e.value) == (f"verify reads with image_size, num_heads, overrides only, not {named}: "
                            "the reference computes the source as it is")


def test_open_predictor_reads_with_the_options_given(bare):
    labels = [f"l{i}" for i in range(10)]
    assert open_predictor(bare, TOLD, image_size=48).image_size == 48  # keywords vary the options
    pred = open_predictor(bare, TOLD, labels=labels)
    assert pred.image_size == 32 and pred.usage.labels == tuple(labels)
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    ref = GoogleViTReference.from_npz(SRC)
    try:
        want = ref.forward_stages(pixels)["logits"]
    finally:
        ref.close()
    bound = 1e-4 * max(1.0, float(np.sqrt(np.mean(want ** 2))))
    assert float(np.abs(pred.run(pixels) - want).max()) <= bound
    for wrong in (ReadOptions(num_heads=3), ReadOptions(num_heads=1, overrides={"act": "gelu_tanh"})):
        got = open_predictor(bare, wrong).run(pixels)  # timm's exact GELU; another head count
        assert float(np.abs(got - want).max()) > 2 * bound, wrong


class Stop(BadInputError):
    pass


def _captured(monkeypatch, target: str, args):
    seen = []

    def stub(*a, **kw):
        seen.append((a, kw))
        raise Stop("stopped")

    monkeypatch.setattr(target, stub)
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 2 and "stopped" in r.output, r.output
    (call,) = seen
    return call


def test_the_verify_command_builds_one_read_options_from_its_flags(monkeypatch, bare):
    a, kw = _captured(monkeypatch, "_vitconv_cli.verify.run_verify",
                      ["verify", SRC, bare, "--image-size", "48", "--num-heads", "3", "--set", "act=gelu_tanh",
                       "--arch", "vit_tiny_patch16_224", "--batch", "1", "--seed", "5", "--tolerance", "0.001"])
    assert a[2] == ReadOptions(image_size=48, num_heads=3,
                               overrides={"act": "gelu_tanh", "arch": "vit_tiny_patch16_224"})
    assert kw == {"tolerance": 0.001, "batch": 1, "seed": 5}


def test_the_predict_command_builds_one_read_options_from_its_flags(monkeypatch, bare, tmp_path):
    a, kw = _captured(monkeypatch, "_vitconv_cli.predict.open_predictor",
                      ["predict", bare, tmp_path / "x.png", "--image-size", "48", "--num-heads", "3",
                       "--labels", "imagenet-1k", "--arch", "vit_tiny_patch16_224"])
    assert a[1] == ReadOptions(image_size=48, num_heads=3, labels="imagenet-1k",
                               overrides={"arch": "vit_tiny_patch16_224"}) and kw == {}
