"""``phi4flash space build OUT``: write a Hugging Face Space folder that deploys as it is.

The folder holds the Space's ``app.py`` and ``README.md`` (from ``spaces/``), the ``phi4flash`` and
``phi4flash_demo`` packages themselves next to ``app.py`` (Python imports them from the app's folder), and
a ``requirements.txt`` with their dependencies, read from this installation's metadata (the core ones
and the ``demo`` extra). The packages go in as source rather than as a wheel named in
``requirements.txt``: Spaces install the requirements before the rest of the repository is copied in,
so a local wheel path is not there yet at that step.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import phi4flash
from phi4flash.cli import HelpFormatter

PACKAGES = {"phi4flash": Path(phi4flash.__file__).parent, "phi4flash_demo": Path(__file__).parent}
# spaces/ ships inside the wheel as phi4flash_demo/space_template; a source checkout has it at the top.
TEMPLATE_DIRS = (Path(__file__).parent / "space_template", Path(__file__).resolve().parents[2] / "spaces")
TEMPLATE_FILES = ("app.py", "README.md")
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "space_template")


def template_dir() -> Path:
    """The folder with the Space's app.py and README.md."""
    for folder in TEMPLATE_DIRS:
        if all((folder / name).is_file() for name in TEMPLATE_FILES):
            return folder
    raise FileNotFoundError(f"the Space template ({', '.join(TEMPLATE_FILES)}) is in none of "
                            f"{', '.join(map(str, TEMPLATE_DIRS))}; reinstall phi4flash")


def requirements(extra: str = "demo") -> list[str]:
    """phi4flash's own requirements plus those of ``extra``, from the installed distribution's metadata."""
    try:
        declared = requires("phi4flash") or []
    except PackageNotFoundError:
        raise RuntimeError("phi4flash is not installed as a distribution (pip install -e .), so its "
                           "dependencies are unknown") from None
    out = []
    for line in declared:
        requirement, _, marker = (part.strip() for part in line.partition(";"))
        if not marker:
            out.append(requirement)
        elif re.fullmatch(rf"""extra\s*==\s*['"]{re.escape(extra)}['"]""", marker):
            out.append(requirement)
        elif "extra" not in marker:
            out.append(f"{requirement}; {marker}")
    return out


def build_space(out: str | Path, *, force: bool = False) -> Path:
    """Write the deployable Space folder ``out``.

    Args:
        out: The folder to create (it must not exist, or be empty, unless ``force``).
        force: Replace what ``out`` holds.

    Returns:
        The folder.

    Raises:
        FileExistsError: ``out`` exists, is not empty, and ``force`` is false.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    templates = template_dir()
    for name in TEMPLATE_FILES:
        shutil.copy2(templates / name, out / name)
    for name, source in PACKAGES.items():
        shutil.copytree(source, out / name, ignore=_IGNORED)
    lines = [f"# phi4flash {version('phi4flash')} is in ./phi4flash and ./phi4flash_demo, next to app.py; these are "
             "their dependencies.",
             "# Spaces preinstall gradio at the README's sdk_version, which the range below accepts.",
             *requirements("demo")]
    (out / "requirements.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def build_parser(prog: str = "phi4flash space") -> argparse.ArgumentParser:
    """The ``phi4flash space`` options."""
    parser = argparse.ArgumentParser(prog=prog, formatter_class=HelpFormatter,
                                     description="Hugging Face Space tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", formatter_class=HelpFormatter, help="write a deployable Space folder",
                                description="Write a Space folder (app.py, README.md, requirements.txt and the "
                                            "phi4flash packages) that deploys as it is: upload it with "
                                            "`hf upload USER/SPACE OUT . --repo-type space`.")
    build.add_argument("out", help="the folder to write")
    build.add_argument("--force", action="store_true", help="replace the folder if it exists and is not empty")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``phi4flash space``; return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        out = build_space(args.out, force=args.force)
    except (FileExistsError, FileNotFoundError, RuntimeError) as exc:
        print(f"phi4flash space build: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}: run it with `pip install -r requirements.txt && python app.py`, or deploy it with "
          f"`hf upload USER/SPACE {out} . --repo-type space`")
    return 0
