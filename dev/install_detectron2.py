#!/usr/bin/env python
"""
Install detectron2 into the running Python, from the package registry's copy of its v0.6 source.

detectron2's authors do not publish it on PyPI. The registry's `pb1-detectron2==0.6` sdist is the
official v0.6 Python source, file for file, without `detectron2/layers/csrc`, so it cannot be
pip-installed as it is. This script downloads it with pip, checks it is exactly that archive,
applies the small compatibility fixes that upstream made after v0.6 (listed in PATCHES), and
pip-installs the result as an ordinary, non-editable package without the `detectron2._C` ops.

A detectron2 that is already importable and was not installed by this script (for example one a
user built from source with its C++/CUDA ops) is left alone.

With --wheel-dir DIR it installs nothing and instead writes the patched source as a pure-Python
wheel (py3-none-any, model-zoo configs included) into DIR, for a machine that cannot download it
(tools/gpu_check.sh --prepare); the wheel is checked by importing it from a scratch folder.

Usage: python dev/install_detectron2.py [--force | --wheel-dir DIR]
"""
import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

SDIST_REQUIREMENT = "pb1-detectron2==0.6"
SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / "build" / "detectron2"
# Written into the installed package: tells a later run which recipe built it.
RECIPE_MARKER = "_mimicdet_install_recipe.txt"

_GUARDED_C_IMPORT = (
    "try:\n"
    "    from detectron2 import _C\n"
    "except ImportError:  # built without its C++ ops: fail when one is used, not at import\n"
    "    from detectron2._C_missing import _C\n"
)

# The stand-in for detectron2._C, as upstream did after v0.6 ("usable without C extensions").
_C_MISSING_MODULE = '''\
"""Stand-in for detectron2._C when detectron2 was installed without its compiled ops."""


class _MissingCompiledOps:
    def __getattr__(self, name):
        raise ImportError(
            f"detectron2._C.{name} is not available: this detectron2 was installed without its "
            "compiled C++/CUDA ops. Build detectron2 from source to use this feature; for COCO "
            "evaluation, pass use_fast_impl=False to COCOEvaluator."
        )


_C = _MissingCompiledOps()
'''

# (file, old text, new text, how many times the old text must occur). Each fix mirrors upstream's.
PATCHES = [
    # Four modules import the compiled ops at import time; guard them.
    ("detectron2/layers/deform_conv.py", "from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/layers/roi_align_rotated.py", "from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/layers/rotated_boxes.py", "from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    ("detectron2/evaluation/fast_eval_api.py", "from detectron2 import _C\n", _GUARDED_C_IMPORT, 1),
    # Pillow 10 removed Image.LINEAR (it was an alias of BILINEAR).
    ("detectron2/data/transforms/transform.py", "Image.LINEAR", "Image.BILINEAR", 1),
    # NumPy 1.24 removed the np.bool / np.int / np.float / np.str aliases of the builtins.
    ("detectron2/data/build.py", "dtype=np.int)", "dtype=int)", 1),
    ("detectron2/data/build.py", "dtype=np.int\n", "dtype=int\n", 1),
    ("detectron2/data/datasets/pascal_voc.py", "dtype=np.str)", "dtype=str)", 1),
    ("detectron2/structures/masks.py", ".astype(np.bool)", ".astype(bool)", 2),
    ("detectron2/structures/masks.py", "dtype=np.bool)", "dtype=bool)", 1),
    ("detectron2/evaluation/pascal_voc_evaluation.py", ".astype(np.bool)", ".astype(bool)", 2),
    ("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.int)", "dtype=int)", 2),
    ("detectron2/evaluation/sem_seg_evaluation.py", "dtype=np.float)", "dtype=float)", 2),
    ("detectron2/evaluation/sem_seg_evaluation.py", ".astype(np.float)", ".astype(float)", 3),
    ("detectron2/utils/visualizer.py", ".astype(np.bool)", ".astype(bool)", 3),
    ("detectron2/utils/video_visualizer.py", "dtype=np.bool)", "dtype=bool)", 1),
    # torch.meshgrid warns on every call without an explicit indexing.
    (
        "detectron2/modeling/anchor_generator.py",
        "torch.meshgrid(shifts_y, shifts_x)",
        'torch.meshgrid(shifts_y, shifts_x, indexing="ij")',
        1,
    ),
    # RetinaNetHead probed its norm's type with get_norm(norm, 1): GroupNorm(32, 1) raises, so
    # MODEL.RETINANET.NORM "GN" could not build (upstream 330dd329, "get GN type in retinanet").
    (
        "detectron2/modeling/meta_arch/retinanet.py",
        "norm_name = str(type(get_norm(norm, 1)))",
        "norm_name = str(type(get_norm(norm, 32)))",
        1,
    ),
    # setuptools >= 81 no longer ships pkg_resources; the configs sit beside model_zoo.py.
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        'pkg_resources.resource_filename(\n        "detectron2.model_zoo", os.path.join("configs", config_path)\n    )',
        'os.path.join(os.path.dirname(__file__), "configs", config_path)',
        1,
    ),
    # setup.py: install under detectron2's own name, build no C++ extension (its sources are not
    # in the sdist), collect the model-zoo configs from where the sdist keeps them, drop the
    # formatter pin that only upstream's linter needs.
    ("setup.py", 'name="pb1-detectron2"', 'name="detectron2"', 1),
    ("setup.py", "ext_modules=get_extensions(),", "ext_modules=[],", 1),
    (
        "setup.py",
        'glob.glob("configs/**/*.yaml", recursive=True)',
        'glob.glob("configs/**/*.yaml", root_dir=path.dirname(destination), recursive=True)',
        1,
    ),
    (
        "setup.py",
        'glob.glob(\n        "configs/**/*.py", recursive=True\n    )',
        'glob.glob("configs/**/*.py", root_dir=path.dirname(destination), recursive=True)',
        1,
    ),
    ("setup.py", '        "black==21.4b2",\n', "", 1),
]

# What a working install must offer; checked in a fresh interpreter after installing.
SMOKE_TEST = """
import detectron2.layers, detectron2.modeling, detectron2.engine, detectron2.evaluation
import detectron2.data
from detectron2 import model_zoo
assert model_zoo.get_config_file("Base-RetinaNet.yaml")
assert model_zoo.get_config("common/train.py").train.max_iter > 0
"""


def log(message):
    print(f"[detectron2] {message}", flush=True)


def recipe_digest():
    """Digest of this recipe: a change to it re-installs detectron2."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def installed_recipe():
    """
    Returns (installed, recipe): whether `import detectron2` finds a package, and the digest of
    the recipe that installed it (None if it was installed some other way).
    """
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return False, None
    marker = Path(list(spec.submodule_search_locations)[0]) / RECIPE_MARKER
    return True, (marker.read_text().strip() if marker.exists() else None)


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist():
    archive = WORK_DIR / SDIST_NAME
    if not archive.exists() or sha256_of(archive) != SDIST_SHA256:
        log(f"downloading {SDIST_REQUIREMENT} (source only) with pip")
        WORK_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            + ["--no-binary", ":all:", "--no-build-isolation", SDIST_REQUIREMENT]
            + ["--dest", str(WORK_DIR)],
            check=True,
        )
    actual = sha256_of(archive)
    if actual != SDIST_SHA256:
        sys.exit(
            f"{archive}: sha256 {actual} is not the expected {SDIST_SHA256}; refusing to patch "
            "an unknown detectron2 source."
        )
    return archive


def unpack(archive):
    source = WORK_DIR / "src"
    if source.exists():
        shutil.rmtree(source)
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    (top,) = source.iterdir()
    return top


def apply_patches(source):
    for relative_path, old, new, expected_count in PATCHES:
        path = source / relative_path
        text = path.read_text()
        found = text.count(old)
        if found != expected_count:
            sys.exit(
                f"{path}: expected {expected_count} occurrence(s) of {old!r}, found {found}; "
                "this is not the detectron2 v0.6 source the recipe was written for."
            )
        path.write_text(text.replace(old, new))
    missing_ops = source / "detectron2" / "_C_missing.py"
    if missing_ops.exists():
        sys.exit(f"{missing_ops} already exists; this is not the expected v0.6 source.")
    missing_ops.write_text(_C_MISSING_MODULE)
    (source / "detectron2" / RECIPE_MARKER).write_text(recipe_digest() + "\n")
    # setup.py only packages the configs it lists under package_data; the marker must travel too.
    setup_py = source / "setup.py"
    setup_py.write_text(
        setup_py.read_text().replace(
            'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
            'package_data={"detectron2.model_zoo": get_model_zoo_configs(), '
            f'"detectron2": ["{RECIPE_MARKER}"]}},',
        )
    )
    log(f"applied {len(PATCHES)} compatibility fixes")


# Files a wheel must hold: the model zoo reads its configs from inside the package.
WHEEL_MUST_HOLD = (
    "detectron2/model_zoo/configs/Base-RetinaNet.yaml",
    "detectron2/model_zoo/configs/common/train.py",
    "detectron2/_C_missing.py",
    f"detectron2/{RECIPE_MARKER}",
)


def build_wheel(wheel_dir):
    """Writes the patched detectron2 as a py3-none-any wheel into ``wheel_dir``; returns it."""
    wheel_dir = Path(wheel_dir).resolve()
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for old in wheel_dir.glob("detectron2-*.whl"):  # two versions would break a later install
        old.unlink()
    source = unpack(download_sdist())
    apply_patches(source)
    log(f"building a pure-Python wheel into {wheel_dir}")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(wheel_dir), str(source)],
        check=True,
    )
    (wheel,) = wheel_dir.glob("detectron2-*.whl")
    if not wheel.name.endswith("-py3-none-any.whl"):
        sys.exit(f"{wheel.name}: expected a pure-Python py3-none-any wheel")
    with zipfile.ZipFile(wheel) as archive:
        missing = sorted(set(WHEEL_MUST_HOLD) - set(archive.namelist()))
    if missing:
        sys.exit(f"{wheel.name} lacks {missing}")
    # Imported from a scratch folder, so a detectron2 already in this Python cannot answer for it.
    with tempfile.TemporaryDirectory() as target:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile"]
            + ["--target", target, str(wheel)],
            check=True,
        )
        check = SMOKE_TEST + f"assert detectron2.__file__.startswith({target!r})\n"
        env = dict(os.environ, PYTHONPATH=target)
        subprocess.run([sys.executable, "-c", check], check=True, cwd=target, env=env)
    log(f"wrote and verified {wheel}")
    return wheel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true", help="reinstall even if up to date")
    group.add_argument(
        "--wheel-dir", type=Path, help="write a wheel into this folder instead of installing"
    )
    args = parser.parse_args()
    if args.wheel_dir is not None:
        build_wheel(args.wheel_dir)
        return

    installed, recipe = installed_recipe()
    if installed and recipe is None and not args.force:
        log("an importable detectron2 that this recipe did not install is present; leaving it alone")
        return
    if installed and recipe == recipe_digest() and not args.force:
        log("already installed by this recipe; nothing to do")
        return

    source = unpack(download_sdist())
    apply_patches(source)
    log("installing (pure Python, no detectron2._C)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--force-reinstall", str(source)],
        check=True,
    )
    # Run from the build folder so that the check imports the installed copy, not the source.
    subprocess.run([sys.executable, "-c", SMOKE_TEST], check=True, cwd=WORK_DIR)
    log("installed and verified: detectron2.{layers,modeling,engine,evaluation,data}, model zoo")


if __name__ == "__main__":
    main()
