"""The exceptions zsad raises, one per concern of the library (``src/error.rs``).

Every exception of zsad derives from :class:`ZsadError`; several also derive from the
built-in exception a Python caller would expect, so that ``except ValueError`` or
``except FileNotFoundError`` work as usual::

    ZsadError(Exception)
    ├── OptionError(ZsadError, ValueError)       an option out of range, or options that do not go together
    ├── InputError(ZsadError, ValueError)        an image that cannot be scored (undecodable file,
    │                                            wrong dtype or shape, NaN, empty, over max_pixels)
    ├── FileError(ZsadError, OSError)            a file that cannot be read or written (a folder,
    │   │                                        a FIFO, a file over its size bound ...)
    │   └── MissingFileError(FileError, FileNotFoundError)   a file that is not there
    ├── ModelError(ZsadError)                    a model that cannot be found, read or set up
    ├── AdapterError(ZsadError)                  an unusable adapter file or configuration
    ├── DatasetError(ZsadError)                  annotated data that cannot be read (every problem named)
    ├── OutputError(ZsadError)                   an output folder that cannot take the run
    │                                            (an earlier run there: pass resume=True or overwrite=True)
    ├── MismatchError(ZsadError)                 thresholds, a reference bank or an adapter made with
    │                                            other settings (each differing setting named)
    └── DeviceError(ZsadError)                   the device cannot run the work (no CUDA, out of memory)

A run stopped with Ctrl-C raises :class:`KeyboardInterrupt` (what was finished is written).
Messages are zsad's own, with options named as the keyword arguments that set them
(``batch_size=300: at most 256 ...``). ``FileError``, ``InputError`` and ``MismatchError``
carry the file concerned in ``filename`` where there is one.
"""

from typing import Optional

__all__ = [
    "ZsadError",
    "OptionError",
    "InputError",
    "FileError",
    "MissingFileError",
    "ModelError",
    "AdapterError",
    "DatasetError",
    "OutputError",
    "MismatchError",
    "DeviceError",
]


class ZsadError(Exception):
    """Base class of every error zsad raises."""

    filename: Optional[str] = None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OptionError(ZsadError, ValueError):
    """An option's value is out of range, of the wrong type, or options do not go together."""


class InputError(ZsadError, ValueError):
    """An image cannot be scored: it does not decode, or an array is not 8-bit RGB
    (numpy ``uint8``, shape ``(height, width, 3)``), is empty, holds NaN, or is over the
    ``max_pixels`` budget."""


class FileError(ZsadError, OSError):
    """A file cannot be read or written (not a regular file, too large, unreadable)."""


class MissingFileError(FileError, FileNotFoundError):
    """A file that is not there."""


class ModelError(ZsadError):
    """The model cannot be found or read, or does not describe a CLIP model."""


class AdapterError(ZsadError):
    """An adapter file or detector configuration is unusable."""


class DatasetError(ZsadError):
    """Annotated data cannot be read as a labelled dataset (every problem is named)."""


class OutputError(ZsadError):
    """An output folder or file cannot take this run's results."""


class MismatchError(ZsadError):
    """A file made for other settings than this run's (thresholds, a reference bank, an
    adapter), each differing setting named."""


class DeviceError(ZsadError):
    """The device cannot run the work (a build without CUDA, no GPU, out of memory)."""
