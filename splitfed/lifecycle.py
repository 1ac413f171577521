"""Context-manager mixins, so that each resource spells ``__enter__``/``__exit__`` once.

:class:`Closing`: ``with obj:`` gives ``obj`` and calls :meth:`~Closing.close` at the end,
exception or not. :class:`Running`: ``with obj:`` calls :meth:`~Running.start` first and
:meth:`~Running.stop` at the end. Imports nothing heavy: the CLI's launcher uses it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self


class Closing(ABC):
    """A resource released by :meth:`close`; ``with`` releases it on the way out."""

    @abstractmethod
    def close(self) -> None:
        """Release what the object holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Running(Closing):
    """Something started and stopped (a server, a child process); closing it stops it."""

    @abstractmethod
    def start(self) -> object:
        """Start; what it returns is the subclass's business."""

    @abstractmethod
    def stop(self) -> object:
        """Stop with the defaults; safe to call twice."""

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        self.start()
        return self
