"""Generate the committed Python stubs (splitfed/v1) from the protos, or check them.

    python protos/generate.py           # regenerate splitfed/v1/*_pb2*.py(i)
    python protos/generate.py --check   # exit 1 if the committed stubs differ

Uses grpcio-tools' bundled protoc and mypy-protobuf's plugins (pinned in pyproject.toml),
so the output depends only on those versions.
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("splitfed") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _generate(out_dir: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    scripts = Path(sysconfig.get_path("scripts"))
    env = dict(os.environ, PATH=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT, env=env)
    return sorted(
        p for p in (out_dir / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def _committed() -> list[Path]:
    return sorted(p for p in (ROOT / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs differ")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _generate(Path(tmp))
        if not args.check:
            for old in _committed():
                old.unlink()
            for path in fresh:
                shutil.copyfile(path, ROOT / PACKAGE_DIR / path.name)
            print(f"generated {len(fresh)} files in {PACKAGE_DIR}")
            return 0
        fresh_names = {p.name: p for p in fresh}
        committed_names = {p.name: p for p in _committed()}
        drift = False
        for name in sorted(fresh_names.keys() | committed_names.keys()):
            if name not in committed_names:
                print(f"missing committed stub: {PACKAGE_DIR / name}")
                drift = True
                continue
            if name not in fresh_names:
                print(f"stale committed stub (no proto generates it): {PACKAGE_DIR / name}")
                drift = True
                continue
            new = fresh_names[name].read_text().splitlines(keepends=True)
            old = committed_names[name].read_text().splitlines(keepends=True)
            if new != old:
                drift = True
                sys.stdout.writelines(
                    difflib.unified_diff(old, new, f"committed/{name}", f"generated/{name}")
                )
        if drift:
            print("stubs drift from protos/: run `make protos` and commit the result")
            return 1
        print(f"{len(fresh)} committed stubs match protos/")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
