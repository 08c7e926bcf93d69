"""The golden regression suite: checkpoints with outputs computed by someone else's code.

``golden/manifest.json`` lists cases (checkpoint, NHWC input, expected ``logits`` /
``pooled`` / ``prelogits`` / ``encoded`` and, for a resize case, ``posemb_resized``, a max-abs tolerance,
sha256 of every file; compared as every check compares, :mod:`vitconv.verification.compare`,
with the recorded bound absolute). :func:`check` runs every case twice, through the converter
(:func:`vitconv.load` -> canonical model) and through ``verify``'s reference for the
checkpoint's layout (Google and big_vision ``.npz``: the independent NumPy references,
:mod:`vitconv.verification.references.google_numpy` and :mod:`vitconv.verification.references.big_vision_numpy`;
timm, Hugging Face, DINOv2, OpenAI CLIP: the library's own model,
:mod:`vitconv.verification.references.library`, when it is installed; the report notes when it is not),
because a regression in either is a regression: the converter is what users run, the reference
is what ``verify`` trusts. The files' sha256 are checked first, so an edited expectation cannot
pass silently.

:func:`add_case` records a new case: it checks the files load and that vitconv reproduces
them (a case that fails on arrival is a bug report, not a regression test), copies files not
already inside the golden directory, writes their sha256 and the provenance text, and
refuses to replace an existing case unless ``accept=True``.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Union

import numpy as np

from vitconv.errors import BadInputError, VerificationError, first_line
from vitconv.formats.atomic import atomic_output, refuse_clobber, same_file
from vitconv.formats.base import sha256_file
from vitconv.formats.json_doc import parse_json
from vitconv.verification.references.library import LibraryMissing
from vitconv.verification.references.table import has_reference
from vitconv.conversion.pipeline import open_checkpoint
from vitconv.conversion.options import ReadOptions
from vitconv.verification.verify import reference_for
from vitconv.lazy import lazy_module
from vitconv.verification.compare import compare, nchw

loading = lazy_module("vitconv.conversion.loading")  # torch, when a case runs

PathLike = Union[str, os.PathLike]

#: Expected file -> the stage of ``forward_stages`` (and of the reference) it holds.
OUTPUT_STAGES = {"logits": "logits", "pooled": "pooled", "prelogits": "head_input", "encoded": "encoded"}
EXPECTED_KINDS = tuple(OUTPUT_STAGES) + ("posemb_resized",)
DEFAULT_TOLERANCE = 2e-5
MANIFEST = "manifest.json"


@dataclass
class Figure:
    engine: str  # 'converted' | 'reference'
    what: str  # logits | pooled | prelogits | posemb_resized | top1
    max_abs: float
    tolerance: float
    ok: bool
    note: str = ""


@dataclass
class CaseResult:
    name: str
    figures: List[Figure] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.figures) and all(f.ok for f in self.figures)

    def worst(self, engine: str) -> Optional[Figure]:
        figs = [f for f in self.figures if f.engine == engine and f.what != "top1"]
        return max(figs, key=lambda f: f.max_abs) if figs else None


@dataclass
class GoldenReport:
    directory: str
    cases: List[CaseResult]

    @property
    def ok(self) -> bool:
        return bool(self.cases) and all(c.ok for c in self.cases)

    def lines(self) -> List[str]:
        """Per case: max abs diff of each expected output, converter then reference."""
        kinds = [k for k in EXPECTED_KINDS if any(f.what == k for c in self.cases for f in c.figures)]
        w = max([len(c.name) for c in self.cases] + [4])
        head = f"{'case'.ljust(w)}  {'engine':9}  " + "  ".join(f"{k:>14}" for k in kinds) + "  result"
        out = [f"golden     {self.directory} ({len(self.cases)} case(s))", "", head]
        for c in self.cases:
            for engine in ("converted", "reference"):
                figs = {f.what: f for f in c.figures if f.engine == engine}
                if not figs:
                    continue
                cells = "  ".join(f"{figs[k].max_abs:14.2e}" if k in figs else f"{'-':>14}" for k in kinds)
                bad = [f for f in figs.values() if not f.ok]
                res = "ok" if not bad else "FAIL " + ", ".join(f.note or f.what for f in bad)
                out.append(f"{c.name.ljust(w)}  {engine:9}  {cells}  {res}")
            for p in c.problems:
                out.append(f"{c.name.ljust(w)}  FAIL {p}")
            for n in c.notes:
                out.append(f"{c.name.ljust(w)}  note {n}")
        failed = [c.name for c in self.cases if not c.ok]
        out.append("")
        out.append(f"OK: all {len(self.cases)} golden case(s) reproduced" if not failed
                   else f"FAILED: {len(failed)} of {len(self.cases)} case(s): {', '.join(failed)}")
        return out

    def to_dict(self) -> dict:
        return {"directory": self.directory, "ok": self.ok,
                "cases": [{"name": c.name, "ok": c.ok, "problems": c.problems, "notes": c.notes,
                           "figures": [vars(f) for f in c.figures]} for c in self.cases]}


# --------------------------------------------------------------------------- manifest
def load_manifest(directory: PathLike) -> dict:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise BadInputError("no golden manifest here", path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise BadInputError(f"unreadable manifest ({first_line(e)})", path) from None
    m = parse_json(text, "the manifest", path)
    if not isinstance(m, dict) or not isinstance(m.get("cases"), list):
        raise BadInputError("manifest has no 'cases' list", path)
    for i, case in enumerate(m["cases"]):
        wrong = _case_problem(case)
        if wrong:
            raise BadInputError(f"case {i + 1}: {wrong}", path)
    return m


#: What a case must hold (the checks read these), and the type of each.
_CASE_KEYS = {"name": str, "checkpoint": str, "input": str, "expected": dict}
#: What a case may hold besides, and its type (None: JSON null allowed).
_CASE_OPTIONAL = {"tolerance": dict, "sha256": dict, "set": dict, "top1": list, "image_size": int,
                  "input_layout": str}


def _case_problem(case: object) -> Optional[str]:
    """What is wrong with one manifest case, in words (None: nothing)."""
    if not isinstance(case, dict):
        return "not a JSON object"
    for key, kind in _CASE_KEYS.items():
        if not isinstance(case.get(key), kind):
            return f"{key!r} missing or not a {'string' if kind is str else 'JSON object'}"
    for key, kind in _CASE_OPTIONAL.items():
        if case.get(key) is not None and (not isinstance(case[key], kind) or isinstance(case[key], bool)):
            return f"{key!r} is not a {kind.__name__}"
    files = [*case["expected"].values(), *(case.get("sha256") or {}).values()]
    if not all(isinstance(v, str) for v in files):
        return "'expected' and 'sha256' map names to strings"
    bound = (case.get("tolerance") or {}).get("max_abs", DEFAULT_TOLERANCE)
    if type(bound) not in (int, float) or not bound >= 0:
        return "tolerance 'max_abs' is not a non-negative number"
    return None


def _write_manifest(directory: Path, manifest: dict) -> None:
    with atomic_output(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))  # the format the shipped manifest uses


# --------------------------------------------------------------------------- checking
def _input_nhwc(path: Path) -> np.ndarray:
    x = _load_expected(path)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise BadInputError(f"input must be a float NHWC batch (4-D), got {x.dtype} {x.shape}", path)
    return x.astype(np.float32)


def _load_expected(path: Path) -> np.ndarray:
    try:  # mapped first: a header that claims more than the file holds is refused before a byte is read
        a = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(a, np.ndarray):  # an .npz archive
            a.close()
            raise ValueError("an .npz archive, not one array")
        return np.array(a)
    except (OSError, ValueError, MemoryError) as e:
        raise BadInputError(f"not a readable .npy array ({first_line(e)})", path) from None


def _figure(engine: str, what: str, got: np.ndarray, want: np.ndarray, tol: float) -> Figure:
    """``got`` against the case's expected ``want`` by :func:`vitconv.verification.compare.compare`,
    the rule of every check, with the manifest's ``max_abs`` as the bound: an absolute bound is
    that rule with the scale fixed at 1 (``scale=1.0``), so each recorded tolerance keeps its
    meaning (and a NaN fails, as before)."""
    c = compare(got, want, tol, scale=1.0)
    return Figure(engine, what, c.max_abs, tol, c.ok, f"{what} {c.note}" if c.note else "")


def check_case(case: Mapping, directory: PathLike) -> CaseResult:
    """Run one manifest case; relative paths resolve against ``directory``."""
    import torch

    base = Path(directory)
    res = CaseResult(str(case.get("name")))
    for rel, digest in (case.get("sha256") or {}).items():
        p = base / rel
        if not p.exists():
            res.problems.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            res.problems.append(f"{rel}: sha256 differs from the manifest (file changed)")
    if res.problems:
        return res
    tol = float((case.get("tolerance") or {}).get("max_abs", DEFAULT_TOLERANCE))
    ckpt = base / case["checkpoint"]
    x = _input_nhwc(base / case["input"])
    if case.get("input_layout", "NHWC") != "NHWC":
        raise BadInputError(f"case {res.name}: only NHWC inputs are supported", base / MANIFEST)
    expected = {k: _load_expected(base / rel) for k, rel in case["expected"].items()}

    # what a bare file cannot record and its keys leave open (vitconv.archs): said by the case
    told = dict(case.get("set") or {})
    model = loading.load(ckpt, image_size=case.get("image_size"), **told)
    with torch.no_grad():
        got = {k: v.numpy() for k, v in model.forward_stages(torch.from_numpy(nchw(x))).items()}
    ref = want_ref = None
    try:  # a reference that cannot run is a failure of the case, never a missing figure
        with open_checkpoint(ckpt, ReadOptions(overrides=told)) as c:
            if has_reference(c.layout.name):
                ref = reference_for(ckpt, c)
                want_ref = ref.forward_stages(x)
    except LibraryMissing as e:  # an optional library: said, not failed
        res.notes.append(f"reference not run: {e.message}")
    except Exception as e:
        res.problems.append(f"the reference failed ({type(e).__name__}: {first_line(e)})")
        return res
    for what, arr in expected.items():
        if what in OUTPUT_STAGES:
            res.figures.append(_figure("converted", what, got[OUTPUT_STAGES[what]], arr, tol))
            if want_ref is not None and OUTPUT_STAGES[what] in want_ref:
                res.figures.append(_figure("reference", what, want_ref[OUTPUT_STAGES[what]], arr, tol))
        elif what == "posemb_resized":
            res.figures.append(_figure("converted", what, model.pos_embed.detach().numpy(), arr, tol))
            if hasattr(ref, "pos_embed"):  # the NumPy references resize as their code does
                res.figures.append(_figure("reference", what, ref.pos_embed(x.shape[1] // ref.stride), arr, tol))
        else:
            res.problems.append(f"unknown expected output {what!r}")
    top1 = case.get("top1")
    if top1 is not None and "logits" in got:
        pred = got["logits"].argmax(-1).tolist()
        res.figures.append(Figure("converted", "top1", 0.0 if pred == list(top1) else 1.0, 0.0,
                                  pred == list(top1), "" if pred == list(top1) else f"top1 {pred} != {top1}"))
    return res


def check(directory: PathLike = "golden", names: Optional[List[str]] = None) -> GoldenReport:
    """Run every case (or those in ``names``) of ``directory/manifest.json``."""
    manifest = load_manifest(directory)
    cases = manifest["cases"]
    if names:
        unknown = sorted(set(names) - {c["name"] for c in cases})
        if unknown:
            raise BadInputError(f"no such case(s): {', '.join(unknown)}", Path(directory) / MANIFEST)
        cases = [c for c in cases if c["name"] in names]
    return GoldenReport(os.fspath(directory), [check_case(c, directory) for c in cases])


# --------------------------------------------------------------------------- adding
def _place(src: Path, directory: Path, dest_rel: str) -> str:
    """Path of ``src`` relative to ``directory``; copied to ``dest_rel`` when outside it."""
    src = src.resolve()
    try:
        return src.relative_to(directory.resolve()).as_posix()
    except ValueError:
        return dest_rel


def add_case(name: str, checkpoint: PathLike, input: PathLike, expected: Mapping[str, PathLike],
             source: str, directory: PathLike = "golden", image_size: Optional[int] = None,
             tolerance: float = DEFAULT_TOLERANCE, issue: Optional[str] = None,
             accept: bool = False, overrides: Optional[Mapping[str, object]] = None) -> CaseResult:
    """Record a case in ``directory/manifest.json`` (created if absent). Files outside the
    directory are copied to ``cases/<name>/``. ``overrides``: what the checkpoint cannot record
    and its keys leave open (``--set``/``--arch``, recorded as the case's ``set``). Raises
    :class:`BadInputError` for unreadable files or an existing case without ``accept``,
    :class:`VerificationError` when vitconv does not reproduce the expected outputs (nothing is
    written then)."""
    directory = Path(directory)
    if not name or not all(ch.isalnum() or ch in "_-." for ch in name):
        raise BadInputError(f"case name {name!r}: use letters, digits, '_', '-', '.'")
    if not source or not source.strip():
        raise BadInputError("--source is required: say where the expected outputs come from")
    unknown = sorted(set(expected) - set(EXPECTED_KINDS))
    if unknown or "logits" not in expected:
        raise BadInputError(f"expected outputs must include logits and be among {EXPECTED_KINDS}")
    srcs = {"checkpoint": Path(checkpoint), "input": Path(input),
            **{k: Path(v) for k, v in expected.items()}}
    for p in srcs.values():
        if not p.is_file():
            raise BadInputError("no such file", p)
    manifest_path = directory / MANIFEST
    refuse_clobber([manifest_path], list(srcs.values()))
    manifest = load_manifest(directory) if manifest_path.exists() else {
        "description": "Golden cases: checkpoints with outputs computed by independent code.",
        "cases": []}
    existing = [i for i, c in enumerate(manifest["cases"]) if c.get("name") == name]
    if existing and not accept:
        raise BadInputError(f"case {name!r} exists; pass --accept to replace it", manifest_path)

    # Check before writing anything: the files load and vitconv reproduces them.
    trial = {"name": name, "checkpoint": str(srcs["checkpoint"].resolve()),
             "input": str(srcs["input"].resolve()), "input_layout": "NHWC", "image_size": image_size,
             "expected": {k: str(srcs[k].resolve()) for k in expected},
             "tolerance": {"max_abs": float(tolerance)}, **({"set": dict(overrides)} if overrides else {})}
    result = check_case(trial, directory)
    if not result.ok:
        bad = [f for f in result.figures if not f.ok]
        detail = "; ".join(f"{f.engine} {f.note or f.what} max abs {f.max_abs:.3g} > {f.tolerance:g}"
                           for f in bad) or "; ".join(result.problems)
        raise VerificationError(f"not recorded: vitconv does not reproduce the expected outputs ({detail})",
                                srcs["checkpoint"])

    directory.mkdir(parents=True, exist_ok=True)
    folder = f"cases/{name}"
    rel = {"checkpoint": _place(srcs["checkpoint"], directory, f"{folder}/{srcs['checkpoint'].name}"),
           "input": _place(srcs["input"], directory, f"{folder}/{srcs['input'].name}")}
    for k in expected:
        rel[k] = _place(srcs[k], directory, f"{folder}/{name}.{k}.npy")
    copies = {k: directory / r for k, r in rel.items() if not same_file(directory / r, srcs[k])}
    for k, dest in copies.items():  # a copy must not land on another of the case's files
        refuse_clobber([dest], list(srcs.values()))
    distinct = {os.path.realpath(srcs[k]): dest for k, dest in copies.items()}
    refuse_clobber(list(distinct.values()), [])  # nor two different files on one name
    for k, r in rel.items():
        dest = directory / r
        if k in copies:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(dest) as tmp:
                shutil.copyfile(srcs[k], tmp)

    model = loading.load(directory / rel["checkpoint"], image_size=image_size, **dict(overrides or {}))
    logits = np.load(directory / rel["logits"], allow_pickle=False)
    case = {
        "name": name,
        "checkpoint": rel["checkpoint"],
        "input": rel["input"],
        "input_layout": "NHWC",
        "image_size": image_size,
        "expected": {k: rel[k] for k in EXPECTED_KINDS if k in expected},
        "num_params": int(sum(p.numel() for p in model.parameters())),
        "top1": [int(i) for i in np.asarray(logits).argmax(-1)],
        "tolerance": {"max_abs": float(tolerance)},
        **({"set": dict(overrides)} if overrides else {}),
        "issue": issue or "added",
        "sha256": {r: sha256_file(directory / r) for r in dict.fromkeys(rel.values())},
        "provenance": {"source": source.strip(), "added_by": "vitconv golden add",
                       "added": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
    }
    if existing:
        manifest["cases"][existing[0]] = case
    else:
        manifest["cases"].append(case)
    _write_manifest(directory, manifest)
    return check_case(case, directory)
