"""Packaging beyond setup.cfg (which holds the metadata): install `lm_eval_floatsim_autoload.pth`.

The .pth file registers the lm-eval model `mamba_floatsim` when `lm_eval.models` is imported (see
`lm_eval_floatsim_autoload.py`). It must land in site-packages itself, which neither
package_data nor data_files can do, so it is copied into the root of the wheel: by build_py for a
regular wheel, and into the editable wheel for `pip install -e .` (PEP 660, setuptools >= 64),
whose build output is otherwise discarded. Its name sorts after setuptools' `__editable__.*.pth`
files, so in an editable install the package is importable by the time the line runs.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from setuptools.command.sdist import sdist

PTH_FILE = "lm_eval_floatsim_autoload.pth"
HERE = Path(__file__).resolve().parent


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(HERE / PTH_FILE), str(Path(self.build_lib, PTH_FILE)), preserve_mode=False)


class EditableWheelWithPth(editable_wheel):
    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        shutil.copyfile(HERE / PTH_FILE, Path(unpacked_wheel, PTH_FILE))
        return result


class SdistWithPth(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        self.copy_file(str(HERE / PTH_FILE), str(Path(base_dir, PTH_FILE)))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth, "sdist": SdistWithPth})
