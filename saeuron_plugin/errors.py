"""One error family for the whole package.

Every error this package raises on purpose derives from :class:`SAeUronError`, and also from the
built-in exception a caller would naturally catch (``ValueError`` for bad values, ``KeyError`` for
unknown names, ``FileNotFoundError`` for missing files...), so ``except ValueError`` keeps working
while ``except SAeUronError`` catches all of ours. The CLI catches the base class and prints one
line (exit 2); ``--debug`` shows the traceback.

:class:`BadFileError` is what every reader raises for a file it cannot use (truncated, not the
format, a pickle, wrong JSON types, missing fields, NaN/inf values): it names the file and, where
one is at fault, the field.

Torch-free and import-free, so the core, the adapters and the CLI can all use it.
"""

from __future__ import annotations

import os


class SAeUronError(Exception):
    """Base class of every error saeuron-plugin raises on purpose."""


class BadFileError(SAeUronError, ValueError):
    """A file we read is unusable; ``path`` names it, ``field`` the entry at fault (if any)."""

    def __init__(self, path: str | os.PathLike[str], problem: str, field: str | None = None) -> None:
        self.path = str(path)
        self.field = field
        self.problem = problem
        where = f"{self.path}" + (f" (field {field!r})" if field else "")
        super().__init__(f"{where}: {problem}")


class MissingFileError(SAeUronError, FileNotFoundError):
    """A file or folder we need does not exist."""


class UnsupportedModelError(SAeUronError, TypeError):
    """The model (pipeline, denoiser, VLM) is not one of the supported families."""


class HookpointError(SAeUronError, KeyError):
    """A hookpoint path that does not exist or cannot be hooked; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class HookConflictError(SAeUronError, RuntimeError):
    """An editing hook of ours is already installed on this module."""


class NonFiniteError(SAeUronError, FloatingPointError):
    """NaN or inf where a finite value is required (weights about to be saved, an ablation strength)."""


class TrainingDivergedError(NonFiniteError):
    """SAE training produced a non-finite loss or weights; nothing non-finite was written."""


__all__ = [
    "BadFileError",
    "HookConflictError",
    "HookpointError",
    "MissingFileError",
    "NonFiniteError",
    "SAeUronError",
    "TrainingDivergedError",
    "UnsupportedModelError",
]
