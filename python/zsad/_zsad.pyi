"""Type stubs of ``zsad._zsad``, the native half of the zsad package (use ``zsad``).

Options arrive as a dict of keyword arguments with the CLI's names (``batch_size``,
``pixel_threshold`` ...); ``None`` values mean the CLI's default. Errors are raised as the
exceptions of ``zsad._errors``:

==========================  ===============================================================
library error (src/error.rs) Python exception
==========================  ===============================================================
``Error::Option``           ``OptionError`` (a ``ValueError``): range or rule, options named
                            as keyword arguments (``batch_size=300: at most 256 ...``)
``Error::Input``            ``InputError`` (a ``ValueError``), ``filename`` set
``Error::File`` not found   ``MissingFileError`` (a ``FileNotFoundError``), ``filename`` set
``Error::File``             ``FileError`` (an ``OSError``): a folder, a FIFO, too large ...
``Error::Model``            ``ModelError``
``Error::Adapter``          ``AdapterError``
``Error::Dataset``          ``DatasetError``
``Error::Output``           ``OutputError``
``Error::Mismatch``         ``MismatchError``, ``filename`` set
``Error::Device``           ``DeviceError``
``Error::Interrupted``      ``KeyboardInterrupt`` (Ctrl-C during a call)
anything else               ``ZsadError``
==========================  ===============================================================

An unknown keyword argument is a ``TypeError``, as in Python.
"""

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

__version__: str
#: The largest ``batch_size``.
MAX_BATCH_SIZE: int
#: The keyword arguments messages may name (rendered ``name=``).
KEYWORDS: List[str]

class Detector:
    """A built detector with its thresholds (``zsad.Detector`` wraps it)."""

    def __new__(
        cls, model: str, options: Optional[Dict[str, Any]] = None, quiet: bool = False
    ) -> "Detector":
        """Checks ``options`` as ``zsad detect`` does, builds the model (GIL released, Ctrl-C
        honoured) and attaches the references."""

    def detect(
        self,
        images: List[Union[str, np.ndarray]],
        batch_size: Optional[int] = None,
        single: bool = False,
        first: int = 0,
    ) -> List[Dict[str, Any]]:
        """Scores paths and C-ordered ``uint8`` arrays of shape ``(height, width, 3)``,
        ``batch_size`` per model pass, with the GIL released while the model runs (inputs are
        named ``images[first + i]`` in errors, or ``image`` when ``single``). Each result
        has ``score``, ``global_score``, ``width``, ``height``, ``map`` (float32,
        ``(height, width)``), ``map_max``, ``map_mean``, ``map_min``, ``anomalous``, ``mask``
        (bool, ``(height, width)``) and ``regions``."""

    def info(self) -> Dict[str, Any]:
        """The model as ``zsad info --json`` describes it."""

    def settings(self) -> Dict[str, Any]:
        """``run.json``'s settings of the model side."""

    @property
    def image_size(self) -> int:
        """The square size images are resized to for the model."""

    @property
    def gemm(self) -> str:
        """The GEMM in use."""

    @property
    def thresholds(self) -> Tuple[Optional[float], Optional[float]]:
        """``(image threshold, pixel threshold)``."""

    def pass_size(self, batch_size: Optional[int] = None) -> int:
        """Images per model pass for ``batch_size`` (``None``: the detector's own; 0: as the
        CLI picks); ``OptionError`` past 256 or below 0."""

def info(model: str, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """``zsad info --json``."""

def detect_folder(
    inputs: Any,
    model: str,
    options: Optional[Dict[str, Any]] = None,
    quiet: bool = False,
    command: List[str] = ...,
) -> Dict[str, Any]:
    """``zsad detect``: the records and the run's summary (``command`` goes to run.json)."""

def evaluate(
    out: str,
    model: Optional[str] = None,
    options: Optional[Dict[str, Any]] = None,
    quiet: bool = False,
    command: List[str] = ...,
) -> Dict[str, Any]:
    """``zsad eval`` writing to ``out``: the metrics as ``metrics.json`` holds them, with
    ``images`` and ``seconds``."""

def calibrate(
    out: str,
    model: Optional[str] = None,
    options: Optional[Dict[str, Any]] = None,
    quiet: bool = False,
) -> Tuple[Dict[str, Any], Optional[str]]:
    """``zsad calibrate`` writing ``out``: the thresholds file as a dict, and why no pixel
    threshold was chosen when none was."""

def read_image(path: Any, max_pixels: Optional[int] = None) -> np.ndarray:
    """An image file decoded as ``zsad detect`` decodes its inputs, as ``uint8``
    ``(height, width, 3)``."""

def render_options(text: str) -> str:
    """``text`` with backticked option fields as keyword arguments (`` `batch_size` `` as
    ``batch_size=``)."""
