# Triton loads this file; the model itself lives in the kvtriton package (kvtriton.backend.triton_model).
from kvtriton.backend.triton_model import TritonPythonModel  # noqa: F401
