"""The base install is the runtime: a fresh virtual environment without PyTorch runs a bundle.

Builds a new venv, installs this project without extras (numpy, pillow, onnxruntime and the
small libraries the runtime needs; pip takes them from its cache or the package registry),
checks that torch is absent, then segments an image with the session's `tiny` bundle through
the Python API and through `scan segment --bundle`. Commands that need PyTorch must say which
extra to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest
from PIL import Image

from conftest import PROJECT_ROOT
from runtime.synthetic import synthetic_scene


def _run(args, cwd, timeout=900, check=True):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert result.returncode == 0, f"{args}: {result.stdout[-2000:]} {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime_env")
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "-q", str(PROJECT_ROOT)], cwd=root)
    return root, python


def test_base_install_has_no_torch(runtime_env):
    root, python = runtime_env
    probe = "import importlib.util as u; print([m for m in ('torch', 'open_clip', 'onnx', 'tensorrt') if u.find_spec(m)])"
    assert _run([python, "-c", probe], cwd=root).stdout.strip() == "[]"


def test_runtime_only_install_segments(runtime_env, tiny_bundle):
    root, python = runtime_env
    script = f"""
import sys
from runtime import Segmenter
from runtime.synthetic import synthetic_scene
segmenter = Segmenter({str(tiny_bundle.path)!r}, cache_dir={str(root / 'cache')!r})
segmenter.set_vocabulary("voc20")
result = segmenter.segment(synthetic_scene(96, 128, seed=4))
assert result.label_map.shape == (96, 128)
assert "torch" not in sys.modules
print("ok", result.classes[result.present[0]])
"""
    assert _run([python, "-c", script], cwd=root).stdout.startswith("ok")

    image = root / "scene.png"
    Image.fromarray(synthetic_scene(96, 128, seed=4)).save(image)
    scan = python.with_name("scan")
    _run([scan, "segment", image, "--bundle", tiny_bundle.path, "--vocab", "sky,grass,house", "--out", root / "out",
          "--save-logits"], cwd=root)
    assert {p.name for p in (root / "out").iterdir()} == {"scene.png", "scene_overlay.png", "scene.npz"}
    doctor = _run([scan, "doctor", "--bundle", tiny_bundle.path], cwd=root)
    assert "not installed (optional" in doctor.stdout and "files match their sizes and sha256" in doctor.stdout

    eager = _run([scan, "segment", image, "--config", "tiny", "--vocab", "sky", "--out", root / "eager"], cwd=root, check=False)
    assert eager.returncode == 2 and "scan-deploy[export]" in eager.stderr and "Traceback" not in eager.stderr
    assert not (root / "eager").exists()
