# Triton loads this file; the model itself lives in the kvtriton package (kvtriton.backend.triton.model).
from kvtriton.backend.triton.model import TritonPythonModel  # noqa: F401
