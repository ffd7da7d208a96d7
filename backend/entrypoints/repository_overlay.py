"""A model repository with some engine parameters changed, the original untouched (`kvtriton serve --model`,
`--engine-arg`): how vLLM's `vllm serve <model> --max-num-seqs 32` reads on a Triton model repository.

The overlay is a temporary folder beside nothing: each model of the original is a symbolic link to its folder,
except a changed model, which is a folder of links to the original's files and a copy of its config.pbtxt
with the new values (pbtxt_parameters.set_parameters). Nothing is copied but that file, so a repository of
built engines costs nothing to overlay. The values are checked by the model itself at load, as any
config.pbtxt's are: a misspelt key fails the start naming it.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters

DEFAULT_MODEL = "llm"
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_engine_arg(arg: str) -> tuple[str, str, str]:
    """`KEY=VALUE` (the `llm` model's) or `MODEL/KEY=VALUE` -> (model, key, value); ValueError naming the form."""
    target, sep, value = arg.partition("=")
    model, _, key = target.rpartition("/")
    if not sep or not _KEY.fullmatch(key):
        raise ValueError(f"--engine-arg {arg!r}: write KEY=VALUE (the {DEFAULT_MODEL} model's config.pbtxt "
                         "parameter), or MODEL/KEY=VALUE for another model")
    if '"' in value or "\\" in value:
        raise ValueError(f"--engine-arg {arg!r}: a value cannot hold a quote or a backslash")
    return model or DEFAULT_MODEL, key, value


def grouped(args: Iterable[tuple[str, str, str]]) -> dict[str, dict[str, str]]:
    """(model, key, value) triples -> {model: {key: value}}, the last value of a key winning."""
    out: dict[str, dict[str, str]] = {}
    for model, key, value in args:
        out.setdefault(model, {})[key] = value
    return out


def check_models(repository: Path, overrides: Mapping[str, Mapping[str, str]]) -> None:
    """ValueError naming a model the overrides name that the repository does not hold."""
    for model in overrides:
        if not (repository / model / "config.pbtxt").is_file():
            held = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
            raise ValueError(f"--engine-arg names model {model!r}, which {repository} does not hold "
                             f"(it holds: {', '.join(held) or 'no model'})")


def overlay_repository(repository: Path, overrides: Mapping[str, Mapping[str, str]]) -> Path:
    """A temporary repository serving `repository` with `overrides` ({model: {parameter: value}}) applied;
    the caller removes it (shutil.rmtree removes the links, never what they point to)."""
    repository = Path(repository).resolve()
    check_models(repository, overrides)
    overlay = Path(tempfile.mkdtemp(prefix="kvtriton-repository-"))
    for entry in repository.iterdir():
        if entry.name not in overrides:
            (overlay / entry.name).symlink_to(entry)
            continue
        model = overlay / entry.name
        model.mkdir()
        for item in entry.iterdir():
            if item.name != "config.pbtxt":
                (model / item.name).symlink_to(item)
        (model / "config.pbtxt").write_text((entry / "config.pbtxt").read_text())
        set_parameters(model / "config.pbtxt", overrides[entry.name])
    return overlay
