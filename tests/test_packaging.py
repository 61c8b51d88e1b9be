"""What a user installs: the wheel ships the recipes found by name, and the source distribution is complete (its
tests collect from the unpacked archive, and the pages README links are in it)."""

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """The tracked files of this checkout, copied: building writes egg-info next to the sources."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    copy = tmp_path_factory.mktemp("source")
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    return copy


def build(copy: Path, kind: str, out: Path) -> Path:
    command = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", command], cwd=copy, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / result.stdout.strip().splitlines()[-1]


def test_the_wheel_ships_the_recipes_found_by_name(source_copy, tmp_path):
    names = zipfile.ZipFile(build(source_copy, "wheel", tmp_path)).namelist()
    for recipe in ("demo", "tiny_cpu", "study_tiny"):
        assert f"trl_thr/cli/configs/{recipe}.yaml" in names, recipe


def test_the_sdist_is_complete_and_its_tests_collect(source_copy, tmp_path):
    with tarfile.open(build(source_copy, "sdist", tmp_path)) as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)", (ROOT / "README.md").read_text()):
        assert (unpacked / link).exists(), link
    for helper in ("tests/conftest.py", "tests/helpers.py", "tests/workers", "benchmarks/measure.py"):
        assert (unpacked / helper).exists(), helper
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                            cwd=unpacked, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(unpacked / "src"), "HF_HUB_OFFLINE": "1",
                                 "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    collected = int(re.search(r"(\d+)(?:/\d+)? tests collected", result.stdout).group(1))
    assert collected > 600 and "error" not in result.stdout.splitlines()[-1], result.stdout[-500:]
