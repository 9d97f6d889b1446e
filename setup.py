"""Build step (everything else is in pyproject.toml): the wheel carries the small published checkpoints.

weights/<arch>.<tag>/ in the repository is the source of truth; a checkout (and an editable install) loads it in
place. A wheel gets a copy of each folder whose model.safetensors is at most BUNDLE_MAX_MB, as package data in
cpc_models/weights/<arch>.<tag>/ (model.safetensors, config.json, README.md), so that
``timm.create_model('<arch>.<tag>', pretrained=True)`` works offline after ``pip install``. Larger checkpoints are
published on the Hugging Face Hub only. The sdist carries weights/ too (MANIFEST.in).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED_FILES = ('model.safetensors', 'config.json', 'README.md')
BUNDLE_MAX_MB = 10


class BuildPyWithWeights(build_py):
    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return  # an editable install loads weights/ from the checkout
        for weights in sorted((ROOT / 'weights').glob('*/model.safetensors')):
            folder = weights.parent
            if weights.stat().st_size > BUNDLE_MAX_MB * 2 ** 20:
                self.announce(f'not bundling {folder.name} ({weights.stat().st_size / 2 ** 20:.0f} MB > '
                              f'{BUNDLE_MAX_MB} MB): it loads from the Hugging Face Hub', level=2)
                continue
            out = Path(self.build_lib) / 'cpc_models' / 'weights' / folder.name
            out.mkdir(parents=True, exist_ok=True)
            for name in BUNDLED_FILES:
                if (folder / name).is_file():
                    shutil.copyfile(folder / name, out / name)


setup(cmdclass={'build_py': BuildPyWithWeights})
