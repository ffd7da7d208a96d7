"""The string parameters of a Triton model's config.pbtxt: how the `llm` model's engine knobs are read and set
outside Triton (kvtriton build writes them, kvtriton serve --engine-arg overrides them, tests and benchmarks
make variants).

Only the one-line form that model_repository/llm/config.pbtxt uses is recognised (Triton itself accepts any
protobuf text layout).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

# The one-line form of a string parameter.
_PARAMETER = r'parameters \{{ key: "{key}" value: \{{ string_value: "{value}" \}} \}}'


def set_parameters(config_pbtxt: str | Path, parameters: Mapping[str, str]) -> None:
    """Set string parameters of a config.pbtxt in place: an entry with the key is replaced where it stands,
    a missing key is appended. The one way to edit a model's engine parameters (build, test fixtures,
    benchmarks)."""
    path = Path(config_pbtxt)
    text = path.read_text()
    for key, value in parameters.items():
        if '"' in value or "\\" in value:
            raise ValueError(f"parameter {key}: {value!r} contains a quote or backslash; choose another value "
                             f"(config.pbtxt strings are written unescaped)")
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        text, n = re.subn(_PARAMETER.format(key=re.escape(key), value='[^"]*'), lambda _: line, text)
        if not n:
            text = text.rstrip("\n") + "\n" + line + "\n"
    path.write_text(text)


def read_parameters(config_pbtxt: str | Path) -> dict[str, str]:
    """The string parameters of a config.pbtxt (tests and tools: what the engine will be given)."""
    text = Path(config_pbtxt).read_text()
    return dict(re.findall(_PARAMETER.format(key='([^"]+)', value='([^"]*)'), text))
