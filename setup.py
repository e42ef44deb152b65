"""Package list for the package-dir mapping in pyproject.toml: kernels/ and evals/ install as lctk.kernels and
lctk.evals, never as top-level modules (transformers imports a Hugging Face package named `kernels`). Their roots
have no __init__.py (namespace packages), so they are listed here by hand; their sub-packages are found."""

from setuptools import find_packages, setup


def mapped(package: str, folder: str) -> list[str]:
    return [package] + [f"{package}.{sub}" for sub in find_packages(folder)]


setup(packages=mapped("lctk", "lctk") + mapped("lctk.kernels", "kernels") + mapped("lctk.evals", "evals"))
