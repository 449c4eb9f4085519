"""Download, on this machine, the wheels the lent GPU machine lacks, for its Python 3.12, into .whl/.

The GPU machine reaches no package index; its image has torch 2.11, transformers 5.17 and
huggingface_hub 1.33 but no diffusers (the device tool's KINDS.md lists its packages). siso needs
newer ones, so they travel with the call (`carry: [".whl"]`, 64 MiB in all with the working tree):
each at the version installed here, the one the suite passed with, ``--no-deps``, one version of each.
Every requirement of a carried wheel that is neither carried nor on the machine is reported: a wheel
that cannot import there is found here, not in device time.

    python benchmarks/gpu/fetch_wheels.py            # -> .whl/ (git-ignored), then prints the total size
    python benchmarks/gpu/fetch_wheels.py --check    # only the size and requirement checks of .whl/
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
LIMIT_MIB = 64  # the device tool's limit on what travels (the working tree included)

#: what siso needs that the GPU machine lacks, or has older than pyproject's lower bound
CARRIED = ("diffusers", "transformers", "huggingface_hub", "httpx2", "httpcore2", "truststore", "peft",
           "platformdirs")
#: what the GPU machine's image has (KINDS.md, read 2026-11-17), by canonical name: versions where known
ON_THE_MACHINE = {
    "torch": "2.11.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "accelerate": "1.15.0",
    "safetensors": "0.8.0", "tokenizers": "0.23.2", "numpy": "2.5.2", "torchmetrics": "1.9.0",
    "torchvision": "0.26.0", "triton": "3.6.0", "sentencepiece": "0.2.2",
    **dict.fromkeys(("pillow", "pyyaml", "regex", "requests", "filelock", "fsspec", "packaging", "tqdm", "httpx",
                     "hf-xet", "typer", "rich", "matplotlib", "scipy", "psutil", "jinja2", "networkx", "sympy",
                     "typing-extensions", "click", "shellingham", "anyio", "certifi", "idna", "markdown-it-py",
                     "pygments", "urllib3", "charset-normalizer", "h11", "httpcore", "mdurl", "importlib-metadata",
                     "zipp", "setuptools"), None),
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(name: str, version: str) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(WHEELS), f"{name}=={version}"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command, check=True)


#: the GPU machine, as environment markers see it
THERE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
         "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
         "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def requirements(wheel: Path) -> list:
    """The wheel's requirements that apply on the GPU machine (no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        text = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(THERE):
                names.append(requirement)
    return names


def check(folder: Path = WHEELS) -> int:
    wheels = sorted(folder.glob("*.whl"))
    names = {canonical(w.name.split("-")[0]): w for w in wheels}
    if len(names) != len(wheels):
        print("error: two versions of one package in .whl/ (the install there stops): delete the old one")
        return 1
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f".whl/: {len(wheels)} wheels, {size:.1f} MiB (limit {LIMIT_MIB} MiB with the working tree)")
    needed = [(w, req) for w in wheels for req in requirements(w)]
    missing = sorted({canonical(req.name) for _, req in needed} - set(names) - set(ON_THE_MACHINE))
    if missing:
        print(f"error: needed by the carried wheels, neither carried nor on the GPU machine: {', '.join(missing)}")
        return 1
    too_old = sorted({f"{req} (there: {ON_THE_MACHINE[canonical(req.name)]}, for {w.name.split('-')[0]})"
                      for w, req in needed if canonical(req.name) not in names
                      and ON_THE_MACHINE.get(canonical(req.name))
                      and not req.specifier.contains(ON_THE_MACHINE[canonical(req.name)], prereleases=True)})
    if too_old:
        print(f"error: on the GPU machine at a version the carried wheels refuse: {'; '.join(too_old)}")
        return 1
    return 1 if size >= LIMIT_MIB else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check .whl/ without downloading")
    args = parser.parse_args()
    if not args.check:
        WHEELS.mkdir(exist_ok=True)
        for name in CARRIED:
            version = metadata.version(name)
            for old in WHEELS.glob(f"{name.replace('-', '_')}-*.whl"):
                if f"-{version}-" not in old.name:
                    old.unlink()
            download(name, version)
            print(f"{name}=={version}")
    return check()


if __name__ == "__main__":
    sys.exit(main())
