"""Write a ready-to-serve Triton model directory for a built model.

    <out>/<name>/config.pbtxt        the shipped llm config, parameters pointing at the files below
    <out>/<name>/1/model.py          the same shim as model_repository/llm/1/model.py
    <out>/<name>/1/hf/               config.json + tokenizer files (no weights: the graph carries them)
    <out>/<name>/1/model.onnx        step graph; model.engine too for tensorrt
    <out>/<name>/1/manifest.json

config.pbtxt holds absolute paths: Triton does not say where the model file
lives to the engine config, and a relative path would resolve against
tritonserver's working directory. Moving the repository means rebuilding it
(or editing those two parameters).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters

# Files of an HF folder the engine reads besides weights (tokenizer, chat template, generation defaults).
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja")


def template_dir() -> Path:
    """model_repository/llm of this checkout (or of an install that ships it beside the package)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "model_repository" / "llm", here / "model_repository" / "llm"):
        if (candidate / "config.pbtxt").is_file():
            return candidate
    raise FileNotFoundError("model_repository/llm (the template config.pbtxt) was not found beside the kvtriton "
                            "package; build from a source checkout of kvtriton")


def prepare_model_dir(out: str | Path, name: str, overwrite: bool) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it is a Triton model name)")
    model_dir = Path(out).resolve() / name
    if model_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{model_dir} already exists; pass --overwrite or choose another --name")
        shutil.rmtree(model_dir)
    (model_dir / "1" / "hf").mkdir(parents=True)
    return model_dir


def copy_hf_files(checkpoint: Path, model_dir: Path) -> Path:
    dst = model_dir / "1" / "hf"
    copied = [f for f in HF_FILES if (checkpoint / f).is_file()]
    if "config.json" not in copied or "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{checkpoint} lacks config.json or tokenizer.json; the served model needs both")
    for f in copied:
        shutil.copy2(checkpoint / f, dst / f)
    return dst


def write_triton_files(model_dir: Path, parameters: dict[str, str]) -> Path:
    """config.pbtxt (template with `parameters` set) and the model.py shim."""
    template = template_dir()
    config = model_dir / "config.pbtxt"
    shutil.copy2(template / "config.pbtxt", config)
    set_parameters(config, parameters)
    shutil.copy2(template / "1" / "model.py", model_dir / "1" / "model.py")
    return config
