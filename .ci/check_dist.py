"""Check an installed gyrodrop wheel in a clean environment (run by `make dist`).

    cd build/dist-venv && bin/python ../../.ci/check_dist.py ../../dist

Run from outside the source tree, with a venv that holds only the pinned torch and the
wheel (no extras). Fails unless: gyrodrop is imported from site-packages, its version
matches the wheel and sdist file names, the ``py.typed`` marker ships, no optional
extra is installed or imported by ``import gyrodrop``, every public name resolves, and a
GyroDropout forward works.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

OPTIONAL = ("sklearn", "matplotlib", "rich", "lightning", "transformers", "scipy", "triton")


def main(dist_dir: str) -> None:
    dist = Path(dist_dir)
    wheels = list(dist.glob("gyrodrop-*.whl"))
    sdists = list(dist.glob("gyrodrop-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        sys.exit(f"check_dist: expected one wheel and one sdist in {dist}, got {wheels + sdists}")

    present = [name for name in OPTIONAL if importlib.util.find_spec(name) is not None]
    if present:
        sys.exit(f"check_dist: the venv is not clean, optional packages present: {present}")

    import torch

    import gyrodrop

    location = Path(gyrodrop.__file__).resolve()
    if "site-packages" not in location.parts:
        sys.exit(f"check_dist: gyrodrop imported from {location}, not from the installed wheel")
    version = gyrodrop.__version__
    for artifact in (*wheels, *sdists):
        if not artifact.name.startswith(f"gyrodrop-{version}"):
            sys.exit(f"check_dist: {artifact.name} does not carry version {version}")
    if not (location.parent / "py.typed").is_file():
        sys.exit("check_dist: py.typed marker missing from the installed package")

    missing = [name for name in gyrodrop.__all__ if not hasattr(gyrodrop, name)]
    if missing:
        sys.exit(f"check_dist: public names missing: {missing}")
    leaked = sorted(name for name in OPTIONAL if name in sys.modules)
    if leaked:
        sys.exit(f"check_dist: `import gyrodrop` imported optional packages: {leaked}")

    drop = gyrodrop.GyroDropout(0.5, num_subnets=8, subnets_per_step=2, steps_per_set=1)
    y = drop(torch.ones(4, 8))
    if y.shape != (4, 8):
        sys.exit(f"check_dist: GyroDropout returned shape {tuple(y.shape)}")
    names = len(gyrodrop.__all__)
    print(f"check_dist: gyrodrop {version} from {location.parent} OK ({names} public names)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dist")
