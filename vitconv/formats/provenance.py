"""Provenance: the strings vitconv records in every output with a place for them (a safetensors
header, a shard index's ``metadata``, a vitconv ``.pt``'s wrapper, a TorchScript extra file,
ONNX ``metadata_props``), as one schema that both writes and reads them.

Why one dataclass: the keys were string literals in six modules, and a writer that kept only
the ones it knew of (the ``.pt`` kept six and dropped the batch's row and the source's
fingerprint) made a manifest rerun reconvert every ``.pt`` row. Here each key is a row of
:data:`KEYS`, written in one order (the order the outputs have always had, so their bytes do
not change), and read back in full: keys a newer vitconv records that this one does not know
(``vitconv_*``) are kept in :attr:`Provenance.other` and written out again untouched.

Three kinds of key: what a canonical output derives from the model it holds (its config,
preprocessing, class names: read into the checkpoint, written again from it), what travels as
recorded (the architecture the source was read as, and unknown keys), and what describes *this
write* (the source and its hash, vitconv's version, the batch row, whether the files were
verified). A conversion of a vitconv output hands the second kind on (:meth:`Provenance.carried`)
and records the third afresh: an output is verified, or made by a batch row, only if its own
write was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Tuple, Union

#: The prefix of vitconv's own keys: any such key is provenance, known here or not.
PREFIX = "vitconv_"
#: Whether a key is derived from the model, handed on as recorded, or describes the write.
MODEL, CARRIED, WRITE = "model", "carried", "write"

#: ``(field of Provenance, metadata key, kind)``, in the order an output records them.
KEYS: Tuple[Tuple[str, str, str], ...] = (
    ("config", "vitconv_config", MODEL),                   # ViTConfig.to_json() (a .pt: its "config" dict)
    ("preprocessing", "vitconv_preprocessing", MODEL),     # Preprocessing.to_json()
    ("labels", "vitconv_labels", MODEL),                   # a shipped list's name, else a JSON list
    ("source_sha256", "source_sha256", WRITE),             # the source's SHA-256 (hex)
    ("source", "source", WRITE),                           # the source's file name
    ("version", "vitconv_version", WRITE),                 # vitconv.__version__ that wrote the file
    ("arch", "vitconv_arch", CARRIED),                     # the named architecture the source was read as
    ("batch_row", "vitconv_batch_row", WRITE),             # the manifest row's options, JSON, sorted keys
    ("source_fingerprint", "vitconv_source_fingerprint", WRITE),  # storage.fingerprint of the source
    ("verified", "vitconv_verified", WRITE),               # "true": checked before it was renamed into place
)
KEY_OF: Dict[str, str] = {name: key for name, key, _ in KEYS}
CONFIG_KEY = KEY_OF["config"]


@dataclass(frozen=True)
class Provenance:
    """The provenance strings of one output (None: not recorded). ``verified`` is the only
    non-string field: the file holds ``"true"`` or nothing."""

    config: Optional[str] = None
    preprocessing: Optional[str] = None
    labels: Optional[str] = None
    source_sha256: Optional[str] = None
    source: Optional[str] = None
    version: Optional[str] = None
    arch: Optional[str] = None
    batch_row: Optional[str] = None
    source_fingerprint: Optional[str] = None
    verified: bool = False
    #: Keys this vitconv does not know (a newer one's ``vitconv_*``, or a caller's own), kept as read.
    other: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "other", MappingProxyType(dict(self.other)))

    @classmethod
    def of(cls, given: Union["Provenance", Mapping[str, str], None]) -> "Provenance":
        """``given`` as provenance: a caller's strings are all kept (:meth:`from_metadata`)."""
        return given if isinstance(given, Provenance) else cls.from_metadata(given or {}, keep_all=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], keep_all: bool = False) -> "Provenance":
        """The provenance in a file's metadata strings. Keys that are not provenance (safetensors'
        ``format``, a shard index's ``total_size``, ONNX's ``opset``) are left out unless
        ``keep_all`` (a caller's own strings, to be written with the rest)."""
        known = {key: name for name, key, _ in KEYS}
        values: Dict[str, object] = {}
        other: Dict[str, str] = {}
        for k, v in metadata.items():
            if k in known:
                values[known[k]] = v == "true" if k == KEY_OF["verified"] else v
            elif keep_all or k.startswith(PREFIX):
                other[k] = v
        return cls(**values, other=other)  # type: ignore[arg-type]

    def metadata(self, *, without: Tuple[str, ...] = ()) -> Dict[str, str]:
        """The metadata strings, in :data:`KEYS` order then :attr:`other`; ``without``: fields
        the container records otherwise (a ``.pt`` holds its config as a dict)."""
        out: Dict[str, str] = {}
        for name, key, _ in KEYS:
            value = getattr(self, name)
            if name in without or value is None or value is False:
                continue
            out[key] = "true" if value is True else value
        out.update(self.other)
        return out

    def carried(self) -> "Provenance":
        """What a conversion of this file hands on to its outputs as recorded: the ``CARRIED``
        fields and unknown keys (the ``MODEL`` ones are re-derived from the model read, and only
        a canonical output records them; nothing of this write's)."""
        return Provenance(**{name: getattr(self, name) for name, _, kind in KEYS if kind == CARRIED},
                          other=self.other)

    def updated(self, newer: "Provenance") -> "Provenance":
        """This, with every field ``newer`` records in its place (``other``: merged, ``newer``'s win)."""
        given = {f.name: getattr(newer, f.name) for f in dataclasses.fields(self)
                 if f.name != "other" and getattr(newer, f.name) not in (None, False)}
        return dataclasses.replace(self, **given, other={**self.other, **newer.other})


__all__ = ["Provenance", "KEYS", "KEY_OF", "CONFIG_KEY", "MODEL", "CARRIED", "WRITE", "PREFIX"]
