"""splitfed: split federated fine-tuning and inference of large language models.

The import package gathers several top-level folders of the repository (see
``pyproject.toml``): ``splitfed.services``, ``splitfed.clients``, ``splitfed.security`` and
``splitfed.models``; generated protobuf stubs live in ``splitfed.v1``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splitfed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
