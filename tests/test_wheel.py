"""The built wheel installs into a fresh venv and `seesr upscale` works there offline with the embedded default.

Marked `wheel` (about a minute): deselected by `make test`, run by `make test-wheel` and `.ci/run`. The fresh venv
gets only the wheel (no dependencies, no index); the third-party packages come from the current environment's
site-packages through a `.pth` line, which does not process that folder's own `.pth` files, so the editable
install of the checkout stays invisible.
"""

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.wheel


def _run(command, cwd, **kwargs):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


def test_wheel_installs_and_upscales_with_the_embedded_default(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", "outputs", "runs", "data"))  # fmt: skip
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist,
          source], cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("seesr-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout
                .strip())  # fmt: skip
    (site / "_outer_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    Image.open(ROOT / "examples" / "astronaut.png").crop((0, 0, 24, 20)).save(work / "photo.png")
    env = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    where = _run([python, "-c", "import seesr, seesr.tgsr as t; print(seesr.__file__); print(t.default_model_path())"],
                 work, env=env).stdout.split()  # fmt: skip
    assert all(line.startswith(str(env_dir)) for line in where), where  # the installed copy, not the checkout
    _run([env_dir / "bin" / "seesr", "upscale", "photo.png", "-o", "out/"], work, env=env)
    assert Image.open(work / "out" / "photo.png").size == (96, 80)
    version = _run([python, "-m", "seesr", "--version"], work, env=env).stdout
    assert version.strip() == "seesr 0.1.0"
    loader = (Path(where[1]) / "pipeline_tgsr.py").read_text()
    assert "pip install seesr" not in loader and "source tree" in loader
