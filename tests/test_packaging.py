"""`pip install .` into a fresh virtual environment that already holds torch works without make.

The environment reuses this interpreter's installed packages (torch, numpy, tqdm, setuptools) through
a folder of links named in a .pth file — everything except fastbind itself — so nothing is
downloaded (`--no-index`) and the test takes seconds. The C++ extension is skipped
(FASTBIND_NO_EXT=1; `make build` covers compiling it): what is tested is the packaging — the
package list, the declared dependencies, the `fastbind` entry point — and that the installed copy,
not the source tree, imports and runs on the torch backend.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _site_packages() -> Path:
    for path in site.getsitepackages():
        if (Path(path) / "torch").is_dir():
            return Path(path)
    pytest.fail(f"no site-packages with torch among {site.getsitepackages()}")


def _copy_source(dest: Path) -> None:
    """The files a source distribution holds (no build outputs, no compiled extension)."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "fastbind", dest / "fastbind", ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))


def test_pip_install_into_a_fresh_venv_with_torch(tmp_path):
    env_dir, src, links = tmp_path / "env", tmp_path / "src", tmp_path / "deps"
    src.mkdir()
    links.mkdir()
    _copy_source(src)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Reuse the installed packages without exposing this checkout's (editable) fastbind.
    for entry in _site_packages().iterdir():
        if "fastbind" not in entry.name.lower() and entry.suffix != ".pth":
            (links / entry.name).symlink_to(entry)
    env_site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (env_site / "reused.pth").write_text(str(links) + "\n")

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    environ.update(FASTBIND_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", str(src)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    script = (
        "import fastbind, torch\n"
        "print(fastbind.__file__)\n"
        "x, y = torch.randn(4, 8), torch.randn(4, 8)\n"
        "print(float(fastbind.infonce(x, y, temperature=0.1, backend='torch')))\n"
        "import fastbind.train, fastbind.nn\n"
    )
    run = subprocess.run([python, "-c", script], cwd=tmp_path, env=environ, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    installed, loss = run.stdout.split()
    assert Path(installed).is_relative_to(env_site), installed  # the installed copy, not the checkout
    assert float(loss) > 0
    info = subprocess.run([env_dir / "bin" / "fastbind", "info"], cwd=tmp_path, env=environ, capture_output=True)
    assert info.returncode == 0 and b"backends" in info.stdout, info.stderr
