"""Packaging: the built-for-this-torch check, the build record, `python -m rnn_ext`, and what the sdist
and wheel metadata carry. The full sdist -> wheel -> install run is `make dist-check`."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import rnn_ext
from rnn_ext import _extension, machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = torch.__version__.split("+")[0]
MAJOR, MINOR = (int(part) for part in torch.__version__.split(".")[:2])


@pytest.mark.parametrize(
    "built, built_cuda",
    [
        (f"{MAJOR}.{MINOR + 1}.0", None),
        (f"{MAJOR}.{MINOR - 1}.2+cpu", None),
        (f"{MAJOR + 1}.{MINOR}.0", None),
    ],
)
def test_other_minor_release_is_refused_naming_both_versions(built, built_cuda):
    with pytest.raises(ImportError) as raised:
        _extension.check_torch_matches(
            built, built_cuda, running_version=torch.__version__, running_cuda_version=None
        )
    message = str(raised.value)
    assert f"built against torch {built} (CPU-only build)" in message
    assert f"but torch {torch.__version__} (CPU-only build) is running" in message
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in message


def test_cuda_build_and_cpu_build_of_one_release_are_refused_both_ways():
    with pytest.raises(
        ImportError,
        match=r"built against torch 2\.13\.0\+cu130 \(CUDA 13\.0\), but "
        r"torch 2\.13\.0\+cpu \(CPU-only build\) is running",
    ):
        _extension.check_torch_matches("2.13.0+cu130", "13.0", False, "2.13.0+cpu", None)
    with pytest.raises(
        ImportError,
        match=r"built against torch 2\.13\.0\+cpu \(CPU-only build\), but "
        r"torch 2\.13\.0\+cu130 \(CUDA 13\.0\) is running",
    ):
        _extension.check_torch_matches("2.13.0+cpu", None, False, "2.13.0+cu130", "13.0")


def test_cuda_major_version_matters_only_with_cuda_kernels():
    with pytest.raises(ImportError, match=r"CUDA 12\.6.*CUDA 13\.0"):
        _extension.check_torch_matches("2.14.1+cu126", "12.6", True, "2.14.1+cu130", "13.0")
    _extension.check_torch_matches("2.14.1+cu126", "12.6", False, "2.14.1+cu130", "13.0")
    _extension.check_torch_matches("2.14.1+cu130", "13.0", True, "2.14.0+cu130", "13.2")


def test_same_minor_release_is_accepted():
    for built in (torch.__version__, f"{MAJOR}.{MINOR}.9", f"{MAJOR}.{MINOR}.0a0+git1234"):
        _extension.check_torch_matches(
            built, None, running_version=torch.__version__, running_cuda_version=None
        )


def test_build_record_exists_beside_the_extension_and_matches_this_torch():
    record = _extension.build_record()
    assert record is not None, "no rnn_ext/_build_info.py: rebuild (make build)"
    assert os.path.dirname(record.__file__) == os.path.dirname(rnn_ext._C.__file__)
    assert record.TORCH_VERSION == torch.__version__
    assert record.TORCH_CUDA_VERSION == torch.version.cuda
    assert record.CUDA_KERNELS == rnn_ext._C.built_with_cuda
    assert (record.CUDA_ARCH is not None) == record.CUDA_KERNELS
    assert record.VARIANT in ("release", "sanitize", "debug", "sanitize+debug")


def copy_package(tmp_path, torch_version, cuda_version, extension_bytes=None):
    """A copy of the imported rnn_ext package under tmp_path with its build record rewritten, and,
    given extension_bytes, its _C replaced by them."""
    source = os.path.dirname(rnn_ext.__file__)
    copy = tmp_path / "rnn_ext"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    record = copy / "_build_info.py"
    text = re.sub(r"(?m)^TORCH_VERSION = .*$", f"TORCH_VERSION = {torch_version!r}", record.read_text())
    text = re.sub(r"(?m)^TORCH_CUDA_VERSION = .*$", f"TORCH_CUDA_VERSION = {cuda_version!r}", text)
    record.write_text(text)
    if extension_bytes is not None:
        libraries = [path for path in copy.iterdir() if path.name.startswith("_C.") and path.suffix == ".so"]
        assert libraries, f"no _C library in {source}"
        for path in libraries:
            path.write_bytes(extension_bytes)
    return tmp_path


def import_error_of(folder):
    """The ImportError text of `import rnn_ext` in a fresh Python that finds the package in folder."""
    probe = (
        "import importlib.util, sys\n"
        f"assert importlib.util.find_spec('rnn_ext').origin.startswith({str(folder)!r})\n"
        "try:\n"
        "    import rnn_ext\n"
        "except ImportError as error:\n"
        "    print(error)\n"
        "    sys.exit(0)\n"
        "sys.exit('import rnn_ext succeeded')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip()


def test_import_refuses_a_build_for_another_torch_before_loading_it(tmp_path):
    # The copy's _C is not even a library: had the loader opened it, the error would be about an
    # invalid ELF header instead of the versions.
    other = f"{MAJOR}.{MINOR + 1}.0"
    folder = copy_package(tmp_path, other, torch.version.cuda, b"not a shared library")
    message = import_error_of(folder)
    assert f"rnn_ext was built against torch {other}" in message
    assert torch.__version__ in message
    assert "pip install --no-build-isolation" in message
    assert "ELF" not in message


def test_a_library_that_fails_to_load_gets_the_rebuild_hint(tmp_path):
    folder = copy_package(tmp_path, torch.__version__, torch.version.cuda, b"not a shared library")
    message = import_error_of(folder)
    assert message.startswith(f"rnn_ext._C failed to load under torch {torch.__version__}")
    assert f"it was built against torch {torch.__version__}" in message
    assert "pip install --no-build-isolation" in message


def test_python_m_rnn_ext_prints_the_build_report():
    done = subprocess.run(
        [sys.executable, "-m", "rnn_ext"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(":", 1) for line in done.stdout.splitlines())
    fields = {field: value.strip() for field, value in lines.items()}
    assert fields["rnn_ext"].startswith(rnn_ext.__version__ + " (")
    assert fields["torch"].startswith(f"torch {torch.__version__} (")
    assert fields["built against"].startswith(f"torch {torch.__version__} (")
    assert fields["CUDA kernels"].split()[0] == ("yes" if rnn_ext._C.built_with_cuda else "no")
    assert re.match(r"(AVX-512|AVX2\+FMA|AVX\+FMA|baseline)", fields["CPU kernel"])
    assert fields["threads"].startswith(f"{torch.get_num_threads()} intra-op")
    assert fields["OpenMP in rnn_ext._C"] == "yes"
    assert "CUDA" in fields


def _kernel_in_subprocess(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ("RNN_EXT_NO_AVX512", "RNN_EXT_NO_BF16")}
    env.update(env_changes)
    code = "import rnn_ext; print(rnn_ext._C.cpu_kernel())"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_cpu_kernel_follows_the_cpu_flags():
    """The kernel build _C reports is the one the CPU's flags allow, the report shows it, and
    RNN_EXT_NO_AVX512 steps down from AVX-512 to AVX+FMA."""
    flags = machine.cpu_flags()
    if {"avx512f", "avx512vl", "avx512dq", "fma"} <= flags:
        expected = "AVX-512"
        if {"avx512bw", "avx512_bf16"} <= flags:
            expected += "+BF16"
    elif {"avx", "fma"} <= flags:
        expected = "AVX+FMA"
    else:
        expected = "baseline"
    assert _kernel_in_subprocess() == expected
    assert _extension.cpu_kernel_path() == rnn_ext._C.cpu_kernel()
    if {"avx", "fma"} <= flags:
        assert _kernel_in_subprocess(RNN_EXT_NO_AVX512="1") == "AVX+FMA"
    if expected.endswith("+BF16"):
        assert _kernel_in_subprocess(RNN_EXT_NO_BF16="1") == "AVX-512"


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    """setup.py's egg_info: the file list an sdist takes (SOURCES.txt) and the metadata (PKG-INFO),
    without building anything."""
    packaging_files = ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE")
    if not all(os.path.exists(os.path.join(ROOT, name)) for name in packaging_files):
        # e.g. make check-asan's copy of the tree, which takes only what the build and tests need
        pytest.skip("not a full source checkout")
    base = tmp_path_factory.mktemp("egg-info")
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return base / "rnn_ext.egg-info"


def test_sdist_takes_every_file_under_csrc(egg_info):
    listed = set((egg_info / "SOURCES.txt").read_text().split())
    wanted = {
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "setup.py",
        "MANIFEST.in",
        "rnn_ext/__init__.py",
        "rnn_ext/_extension.py",
        "rnn_ext/__main__.py",
    }
    for directory, _, files in os.walk(os.path.join(ROOT, "csrc")):
        wanted.update(os.path.relpath(os.path.join(directory, name), ROOT) for name in files)
    assert any(name.endswith(".cu") for name in wanted) and any(name.endswith(".h") for name in wanted)
    assert sorted(wanted - listed) == []
    assert not [name for name in listed if name.endswith((".so", "_build_info.py"))]


def test_metadata_version_licence_and_torch_pin(egg_info):
    metadata = (egg_info / "PKG-INFO").read_text().splitlines()
    assert f"Version: {rnn_ext.__version__}" in metadata
    assert "License-Expression: BSD-3-Clause" in metadata
    assert f"Requires-Dist: torch<{MAJOR}.{MINOR + 1},>={MAJOR}.{MINOR}" in metadata
    licence = open(os.path.join(ROOT, "LICENSE")).read()
    assert licence.startswith("BSD 3-Clause License")
    assert "Copyright (c) 2026, the rnn_ext authors" in licence
