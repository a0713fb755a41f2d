"""What a run ran on: the lock file's hash, Python, torch, CUDA, cuDNN and the accelerator (tags on every run),
and the installed packages (``environment.txt``); ``lightyard env`` prints the same for a bug report."""

from __future__ import annotations

import functools
import hashlib
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
LOCK_FILE = PROJECT_DIR / "requirements.lock"


def lock_hash() -> str:
    """12 hex characters of the lock file's sha256 (the Docker images are tagged with it), or why there is none."""
    if not LOCK_FILE.is_file():
        return "none (installed without the project's lock file)"
    return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def cudnn_version(code: int) -> str:
    """torch's integer as cuDNN's version: 9.x packs major·10000 + minor·100 + patch (92400 = 9.24.0), 8.x major·1000."""
    major, rest = divmod(code, 10000 if code >= 90000 else 1000)
    return "{}.{}.{}".format(major, *divmod(rest, 100))


@functools.lru_cache(maxsize=1)
def environment_tags() -> dict[str, str]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "lightyard.env.lock": lock_hash(),
        "lightyard.env.python": platform.python_version(),
        "lightyard.env.torch": torch.__version__,
        "lightyard.env.cuda": torch.version.cuda or "none (CPU build)",
        "lightyard.env.cudnn": cudnn_version(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "lightyard.env.accelerator": torch.cuda.get_device_name(0) if cuda else f"cpu: {_cpu_name()}",
        "lightyard.env.platform": platform.platform(),
    }


def _gpus() -> str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi: not found"
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    return out.stdout.strip() or out.stderr.strip()


@functools.lru_cache(maxsize=1)
def environment_report() -> str:
    """The tags, the GPUs and every installed distribution with its version, as plain text."""
    fields = {k.removeprefix("lightyard.env."): v for k, v in environment_tags().items()} | {"executable": sys.executable}
    width = max(len(k) for k in fields)
    lines = [f"{k:<{width}}  {v}" for k, v in fields.items()]
    lines += ["", "# GPUs (nvidia-smi -L)", _gpus(), "", "# installed packages"]
    packages = sorted({(d.metadata["Name"] or "?").lower(): d.version for d in metadata.distributions()}.items())
    lines += [f"{name}=={version}" for name, version in packages]
    return "\n".join(lines) + "\n"


def check_lock(
    pyproject: Path = PROJECT_DIR / "pyproject.toml", lock: Path = LOCK_FILE, extras: tuple[str, ...] = ("test", "datasets")
) -> list[str]:
    """Offline: every requirement of ``pyproject`` (and of its ``extras``) is in ``lock`` at a version its specifier
    admits. A changed or added pin without ``make lock`` is a problem; returns the problems, one line each."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if not lock.is_file():
        return [f"{lock.name} is missing: run `make lock`"]
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    locked: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith(("#", "--")):
            name, version = line.split("==", 1)
            locked[canonicalize_name(name.strip())] = version.split()[0].rstrip("\\").strip()
    problems = []
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement.name} ({text}) is not in {lock.name}: run `make lock`")
        elif requirement.specifier and not requirement.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{lock.name} has {requirement.name}=={locked[name]} but pyproject.toml asks {text}: run `make lock`")
    return problems
