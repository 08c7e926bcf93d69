"""Never unpickle: a checkpoint whose pickle would run code is refused, nothing runs, and
the error says why (``weights_only``).

Each payload's ``__reduce__`` asks the unpickler to call a function that creates a marker
file. A control test loads one with the unrestricted loader in a child process and sees
the marker appear, so the payloads are live and the refusals below mean something.
"""

from __future__ import annotations

import builtins
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import vitconv
from vitconv.errors import BadInputError
from vitconv.formats import open_source


class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _wrap(payload):
    """A plausible checkpoint with the payload hidden beside real weights."""
    return {"state_dict": {"patch_embed.weight": torch.zeros(4, 3, 2, 2)}, "extra": payload}


def _torch_zip(p, payload):
    torch.save(_wrap(payload), p)


def _torch_legacy(p, payload):
    torch.save(_wrap(payload), p, _use_new_zipfile_serialization=False)


def _raw_pickle(p, payload):
    # a plain pickle (starts with \x80, sniffed as pickle); no tensors, whose own pickled
    # form torch.load would meet (and reject) before the payload
    p.write_bytes(pickle.dumps({"state_dict": {"w": [0.0]}, "extra": payload}, protocol=2))


WRITERS = {"torch_zip": _torch_zip, "torch_legacy": _torch_legacy, "raw_pickle": _raw_pickle}
PAYLOADS = {"os.system": (_System, "system"), "exec": (_Exec, "exec"), "eval": (_Eval, "eval")}


def test_control_payload_is_live(tmp_path):
    """Unrestricted loading runs the payload (here only creating an empty file)."""
    for name, writer in WRITERS.items():
        marker = tmp_path / "ran"
        p = tmp_path / "evil.pth"
        writer(p, _Exec(marker))
        if name == "raw_pickle":
            pickle.loads(p.read_bytes())
        else:
            torch.load(p, weights_only=False)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt"])
def test_refused_and_nothing_runs(tmp_path, writer, payload, suffix):
    cls, global_name = PAYLOADS[payload]
    marker = tmp_path / "ran"
    p = tmp_path / f"evil{suffix}"
    WRITERS[writer](p, cls(marker))
    for opener in (open_source, vitconv.load):
        with pytest.raises(BadInputError) as e:
            opener(p)
        msg = str(e.value)
        assert msg.startswith(str(p)) and "\n" not in msg
        assert "refusing to unpickle" in msg and "weights_only=True" in msg, msg
        assert f"the pickle calls {global_name}" in msg or f"calls builtins.{global_name}" in msg \
            or f"calls posix.{global_name}" in msg, msg
        assert e.value.exit_code == 2
    assert not marker.exists()


def test_plain_weights_still_load_under_the_same_restriction(tmp_path):
    """The restriction is not a blanket refusal: a plain state dict reads fine."""
    p = tmp_path / "ok.pth"
    w = torch.arange(48, dtype=torch.float32).reshape(4, 3, 2, 2)
    torch.save({"model": {"module.patch_embed.weight": w}}, p)
    src = open_source(p)
    assert src.keys() == ["patch_embed.weight"]
    np.testing.assert_array_equal(src.get("patch_embed.weight"), np.arange(48, dtype=np.float32).reshape(4, 3, 2, 2))


def test_npz_object_member_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.npz"
    with open(p, "wb") as f:
        np.savez(f, w=np.zeros(3, np.float32), evil=np.array([_Exec(marker)], dtype=object))
    src = open_source(p)
    np.testing.assert_array_equal(src.get("w"), np.zeros(3, np.float32))
    with pytest.raises(BadInputError, match="allow_pickle=False"):
        src.shape("evil")
    with pytest.raises(BadInputError, match="allow_pickle=False"):
        src.get("evil")
    with pytest.raises(BadInputError, match="allow_pickle=False"):
        vitconv.load(p)
    assert not marker.exists()
