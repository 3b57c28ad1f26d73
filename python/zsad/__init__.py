"""zsad: zero-shot visual anomaly detection with CLIP, from Python.

The same library as the ``zsad`` command line (Rust, on candle), with the same options, the
same defaults, the same checks and the same numbers::

    import zsad

    det = zsad.Detector("openai/clip-vit-base-patch16")    # or a folder, a file, "random:tiny"
    r = det.detect("screw.png")                             # a path, a numpy uint8 array or a PIL image
    print(r.score, r.map.shape)                             # image score; float32 map at the image's size

- :class:`Detector` holds a model in memory and scores images (``detect``, ``detect_batch``);
- :func:`detect_folder` is ``zsad detect`` (records, and with ``out=`` the CLI's files);
- :func:`evaluate` is ``zsad eval`` (the papers' metrics on annotated data);
- :func:`calibrate` is ``zsad calibrate`` (image and pixel thresholds);
- :func:`info` is ``zsad info`` (the model, and the GEMM in use);
- :func:`read_image` decodes a file exactly as zsad does, to a numpy array.

Options are the CLI's flags as keyword arguments (``--batch-size 4`` is ``batch_size=4``), with
the CLI's defaults; they are checked as the CLI checks them, and errors are the exceptions of
:mod:`zsad._errors` (all :class:`ZsadError`) with zsad's messages. Long calls release the GIL
and stop on Ctrl-C (``KeyboardInterrupt``). Nothing needs the network when the model is a
local folder or file, or ``random:ARCH`` (random weights, for tests).
"""

import itertools
import os
import sys
import tempfile
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from . import _errors, _zsad
from ._errors import *  # noqa: F401,F403  (the exception classes, listed in _errors.__all__)

__version__: str = _zsad.__version__

__all__ = [
    "__version__",
    "Detector",
    "Detection",
    "detect_folder",
    "evaluate",
    "calibrate",
    "info",
    "read_image",
] + _errors.__all__

PathLike = Union[str, "os.PathLike[str]"]
#: What :meth:`Detector.detect` takes: a path, a numpy ``uint8`` array ``(height, width, 3)``
#: (RGB), or a PIL image.
ImageLike = Union[str, "os.PathLike[str]", np.ndarray, Any]


class Detection:
    """One scored image: what a record of ``zsad detect`` says, with the map (and the defect
    mask) as arrays at the image's size.

    Attributes:
        score: image-level anomaly score in [0, 1] (joint with the map where the method says so).
        global_score: the method's global score before pixel evidence is fused in.
        map: the anomaly map, ``numpy.float32`` of shape ``(height, width)``, values in [0, 1].
        width, height: the image's size (the map's).
        map_max, map_mean, map_min: the map's statistics, as the CLI's records give them.
        anomalous: ``score >= threshold`` with an image threshold, else ``None``.
        mask: ``map >= pixel_threshold`` (``numpy.bool_``, ``(height, width)``) with small regions
            removed (``min_region_area``), with a pixel threshold; else ``None``.
        regions: the mask's connected regions, largest first, each
            ``{"area": int, "bbox": {"x", "y", "width", "height"}, "peak": float}``, with a
            pixel threshold; else ``None``.
        source: the path scored, or ``None`` for an image given in memory.
    """

    __slots__ = (
        "score",
        "global_score",
        "map",
        "width",
        "height",
        "map_max",
        "map_mean",
        "map_min",
        "anomalous",
        "mask",
        "regions",
        "source",
    )

    score: float
    global_score: float
    map: np.ndarray
    width: int
    height: int
    map_max: float
    map_mean: float
    map_min: float
    anomalous: Optional[bool]
    mask: Optional[np.ndarray]
    regions: Optional[List[Dict[str, Any]]]
    source: Optional[str]

    def __init__(self, source: Optional[str] = None, **fields: Any) -> None:
        for k in self.__slots__:
            if k != "source":
                setattr(self, k, fields[k])
        self.source = source

    def to_dict(self) -> Dict[str, Any]:
        """The fields of a ``scores.jsonl`` record (no arrays; ``None`` fields left out)."""
        d: Dict[str, Any] = {}
        if self.source is not None:
            d["path"] = self.source
        for k in ("score", "global_score", "map_max", "map_mean", "map_min", "anomalous",
                  "width", "height"):
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        if self.regions is not None:
            d["regions"] = {"count": len(self.regions), "items": self.regions}
        return d

    def __repr__(self) -> str:
        parts = [f"score={self.score:.6g}", f"global_score={self.global_score:.6g}",
                 f"map=float32[{self.height}x{self.width}]"]
        if self.anomalous is not None:
            parts.append(f"anomalous={self.anomalous}")
        if self.regions is not None:
            parts.append(f"regions={len(self.regions)}")
        if self.source is not None:
            parts.append(f"source={self.source!r}")
        return f"Detection({', '.join(parts)})"


def _is_pil(image: Any) -> bool:
    return type(image).__module__.startswith("PIL.") and hasattr(image, "convert")


def _checked_array(a: np.ndarray, name: str) -> np.ndarray:
    """``a`` if it is an 8-bit RGB image (C-ordered), else an :class:`InputError` that says
    what it is and how to convert it."""
    want = "zsad scores 8-bit RGB images: numpy uint8 of shape (height, width, 3)"
    if a.dtype != np.uint8:
        hint = ""
        if a.dtype.kind == "f":
            if np.isnan(a).any():
                raise InputError(f"{name}: a {a.dtype} array holding NaN; {want}")
            hint = ("; for floats in [0, 1] use (a * 255).round().clip(0, 255).astype(np.uint8)")
        elif a.dtype == np.uint16:
            hint = "; for 16-bit samples use (a / 257).round().astype(np.uint8), as zsad reads 16-bit files"
        raise InputError(f"{name}: a {a.dtype} array of shape {a.shape}; {want}{hint}")
    if a.ndim == 2:
        raise InputError(f"{name}: an array of shape {a.shape} (grey); {want}: "
                         "np.stack([a] * 3, axis=-1) makes it RGB")
    if a.ndim == 3 and a.shape[2] == 4:
        raise InputError(f"{name}: an array of shape {a.shape} (RGBA); {want}: "
                         "a[..., :3] drops the alpha channel (as zsad does for RGBA files)")
    if a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"{name}: an array of shape {a.shape}; {want}")
    if a.size == 0:
        raise InputError(f"{name}: an empty array of shape {a.shape}: image has no pixels")
    return np.ascontiguousarray(a)


def _as_input(image: Any, name: str) -> Union[str, np.ndarray]:
    """A path (``str``) or a checked uint8 RGB array for the native detector."""
    if isinstance(image, (str, bytes, os.PathLike)):
        return os.fsdecode(os.fspath(image))
    if _is_pil(image):
        # PIL's own conversion to RGB (alpha dropped, palettes expanded, 16-bit clipped).
        image = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if isinstance(image, np.ndarray):
        return _checked_array(image, name)
    raise TypeError(
        f"{name}: a path, a numpy uint8 array of shape (height, width, 3) or a PIL image is "
        f"expected, not {type(image).__name__}"
    )


def _options(**given: Any) -> Dict[str, Any]:
    """The keyword arguments that were given (``None`` means the CLI's default)."""
    return {k: v for k, v in given.items() if v is not None}


def _command(function: str, *args: Any, **kwargs: Any) -> List[str]:
    """``run.json``'s ``info.command`` for a call: a command line that repeats it."""
    shown = [repr(os.fspath(a) if isinstance(a, os.PathLike) else a) for a in args]
    shown += [f"{k}={os.fspath(v) if isinstance(v, os.PathLike) else v!r}"
              for k, v in kwargs.items() if v is not None]
    return [sys.executable, "-c", f"import zsad; zsad.{function}({', '.join(shown)})"]


class Detector:
    """A zsad detector held in memory: a CLIP model with an adapter or a preset, and
    optionally reference images and thresholds.

    The options are those of ``zsad detect`` (as keyword arguments, ``--image-size 336`` is
    ``image_size=336``), with its defaults, checked as the CLI checks them. Those that name
    files to write (``out``, ``maps``, ``heatmaps`` ...) belong to :func:`detect_folder`.

    Args:
        model: a model folder, a weight file, a Hugging Face id (``org/name``) or
            ``random:ARCH`` (random weights: ``random:tiny``, ``random:ViT-B-16`` ...).
        preset: the method when no adapter is given (``zero-shot``; ``adaclip``,
            ``anomalyclip``, ``headclip`` and ``zsad`` run untrained parameters without one).
        adapter: an adapter file (from ``zsad train`` or ``zsad import-checkpoint``).
        class_name: the object word in the prompts (e.g. ``"screw"``).
        device: ``"cpu"`` or ``"cuda"`` (a build with the ``cuda`` feature).
        precision: ``"f32"`` or ``"bf16"`` (bf16 GEMMs with f32 accumulation).
        reference: normal images of the product (files or folders, one path or a list), or a
            bank file of ``zsad reference build``.
        thresholds: a ``thresholds.json`` of :func:`calibrate` (sets ``anomalous``, ``mask``
            and ``regions``); refused when calibrated with other settings.
        quiet: no warnings on stderr.
        **options: every other option of ``zsad detect``: ``threshold``, ``pixel_threshold``,
            ``min_region_area``, ``force_thresholds``, ``batch_size``, ``max_pixels``,
            ``image_size``, ``init_seed``, ``joint``, ``joint_alpha``, ``tokenizer``,
            ``force_adapter``, ``activation``, ``dtype``, ``reference_weight``,
            ``reference_only``, ``reference_max_patches``.

    Raises:
        OptionError: an option out of range, or options that do not go together.
        ModelError, AdapterError, MismatchError, FileError: the model, adapter, thresholds or
            references cannot be used.
        TypeError: an unknown keyword argument.

    Example::

        det = zsad.Detector("random:tiny", threshold=0.5, pixel_threshold=0.6)
        r = det.detect(np.zeros((240, 320, 3), np.uint8))
        r.score, r.anomalous, r.map.shape, r.mask.sum(), r.regions
    """

    def __init__(
        self,
        model: PathLike,
        preset: str = "zero-shot",
        adapter: Optional[PathLike] = None,
        class_name: Optional[str] = None,
        device: str = "cpu",
        precision: str = "f32",
        reference: Union[None, PathLike, Sequence[PathLike]] = None,
        thresholds: Optional[PathLike] = None,
        *,
        quiet: bool = False,
        **options: Any,
    ) -> None:
        model = os.fsdecode(os.fspath(model))
        opts = _options(preset=preset, adapter=adapter, class_name=class_name, device=device,
                        precision=precision, reference=reference, thresholds=thresholds,
                        **options)
        self._native = _zsad.Detector(model, opts, quiet)
        self.model: str = model
        self._options = opts

    def detect(self, image: ImageLike) -> Detection:
        """Scores one image, as ``zsad detect`` scores it.

        Args:
            image: a path (decoded as the CLI decodes it: EXIF orientation applied, 16-bit
                samples scaled), a numpy ``uint8`` array of shape ``(height, width, 3)`` (RGB),
                or a PIL image (converted with ``convert("RGB")``).

        Returns:
            A :class:`Detection`: ``score``, ``global_score``, ``map`` (float32, the image's
            size), and with thresholds ``anomalous``, ``mask`` and ``regions``.

        Raises:
            InputError: the image cannot be scored (wrong dtype or shape, NaN, empty, over
                ``max_pixels``, a file that does not decode).
            MissingFileError: the file is not there. FileError: not a regular file (a folder,
                a FIFO).
        """
        item = _as_input(image, "image")
        out = self._native.detect([item], None, True)[0]
        return Detection(source=item if isinstance(item, str) else None, **out)

    def detect_batch(
        self, images: Iterable[ImageLike], batch_size: Optional[int] = None
    ) -> List[Detection]:
        """Scores many images, ``batch_size`` per model pass, with the GIL released while the
        model runs (other Python threads go on) and Ctrl-C honoured between passes.

        Args:
            images: paths, arrays and PIL images, in any mix (see :meth:`detect`).
            batch_size: images per model pass (at most 256; 0 or ``None``: as ``zsad detect``
                picks, about 1024 tokens per pass on a CPU). Scores do not depend on it beyond
                float rounding.

        Returns:
            One :class:`Detection` per image, in order.

        Raises:
            The errors of :meth:`detect`, naming the input (``images[3]: ...``); nothing is
            returned then (use :func:`detect_folder` for runs that record failed inputs and go
            on).
        """
        # A pass's worth at a time: PIL images and generators are converted as they are
        # scored, so memory stays at one pass however many images there are.
        per_pass = self._native.pass_size(batch_size)
        results: List[Detection] = []
        it = iter(images)
        while True:
            chunk = list(itertools.islice(it, per_pass))
            if not chunk:
                return results
            first = len(results)
            items = [_as_input(im, f"images[{first + k}]") for k, im in enumerate(chunk)]
            out = self._native.detect(items, batch_size, False, first)
            results += [Detection(source=i if isinstance(i, str) else None, **o)
                        for i, o in zip(items, out)]

    def info(self) -> Dict[str, Any]:
        """The model, as ``zsad info --json`` describes it: ``source``, ``naming``,
        ``config``, ``grid``, ``vision_parameters``, ``text_parameters``, ``tokenizer`` and
        ``gemm`` (the GEMM in use)."""
        return self._native.info()

    @property
    def settings(self) -> Dict[str, Any]:
        """The settings that decide the scores, as ``run.json`` records them (the weights by
        SHA-256, the adapter, the detector's configuration after every override, the
        references)."""
        return self._native.settings()

    @property
    def gemm(self) -> str:
        """The GEMM in use (e.g. ``gemm (f32)``, ``oneDNN``, ``cuBLAS``)."""
        return self._native.gemm

    @property
    def image_size(self) -> int:
        """The square size images are resized to for the model."""
        return self._native.image_size

    @property
    def threshold(self) -> Optional[float]:
        """The image threshold (``anomalous = score >= threshold``), or ``None``."""
        return self._native.thresholds[0]

    @property
    def pixel_threshold(self) -> Optional[float]:
        """The pixel threshold of the defect mask, or ``None``."""
        return self._native.thresholds[1]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return f"zsad.Detector({self.model!r}{', ' if opts else ''}{opts})"


def detect_folder(
    inputs: Union[PathLike, Sequence[PathLike]],
    model: PathLike,
    out: Optional[PathLike] = None,
    *,
    preset: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    quiet: bool = False,
    **options: Any,
) -> Dict[str, Any]:
    """``zsad detect``: scores image files and folders (searched recursively) as the CLI
    does; inputs that cannot be scored get a record with an ``error`` and the others go on.

    Args:
        inputs: a file or folder, or a list of them.
        model: as for :class:`Detector`.
        out: the output folder: ``scores.jsonl``, ``run.json``, ``maps/``, ``heatmaps/`` (and
            ``masks/`` with a pixel threshold), the same files as ``zsad detect --out``.
            Without it nothing is written and the records are only returned.
        preset, adapter: as for :class:`Detector`.
        quiet: no progress and no per-file notes on stderr.
        **options: every other option of ``zsad detect`` (``maps="npy"``, ``heatmaps="none"``,
            ``threshold``, ``pixel_threshold``, ``thresholds``, ``format``, ``resume``,
            ``overwrite``, ``shard="0/4"``, ``report=True``, ``batch_size`` ...).

    Returns:
        A dict: ``records`` (one dict per input, as the lines of ``scores.jsonl``),
        ``scored``, ``failed``, ``already_done``, ``seconds``, ``records_file``, ``report``
        (the page's path with ``report=True``) and the run's other counts.
    """
    return _zsad.detect_folder(
        inputs, os.fsdecode(os.fspath(model)),
        _options(out=out, preset=preset, adapter=adapter, **options), quiet,
        _command("detect_folder", inputs, model, out=out, preset=preset, adapter=adapter,
                 **options),
    )


def evaluate(
    data: Union[PathLike, Sequence[PathLike]],
    model: Optional[PathLike] = None,
    out: Optional[PathLike] = None,
    *,
    predictions: Optional[PathLike] = None,
    preset: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    quiet: bool = False,
    **options: Any,
) -> Dict[str, Any]:
    """``zsad eval``: the papers' metrics (image AUROC, AP, F1-max; pixel AUROC, AUPRO ...) per
    class and their mean, from a model run over annotated data, or from a finished
    :func:`detect_folder` run (``predictions=``).

    Args:
        data: an MVTec AD root or class folder, a VisA root, a manifest (.csv/.jsonl), or a
            folder of images with masks beside them; or a list of them.
        model: as for :class:`Detector` (or give ``predictions``).
        out: the folder for ``metrics.json``, ``metrics.csv``, ``metrics.md`` and the curve
            plots, as the CLI writes them; without it they are written to a temporary folder
            that is removed.
        predictions: a ``detect_folder`` output folder to evaluate instead of running a model.
        **options: every other option of ``zsad eval`` (``resolution``, ``single_label``,
            ``aupro_grid``, ``class_name``, ``reference`` ...).

    Returns:
        The metrics as ``metrics.json`` holds them (``classes``, ``mean``, ...), with ``images``
        (how many were evaluated) and ``seconds``.
    """
    command = _command("evaluate", data, model, out=out, predictions=predictions,
                       preset=preset, adapter=adapter, **options)
    opts = _options(data=data, predictions=predictions, preset=preset, adapter=adapter,
                    **options)
    m = None if model is None else os.fsdecode(os.fspath(model))
    if out is not None:
        return _zsad.evaluate(os.fspath(out), m, opts, quiet, command)
    with tempfile.TemporaryDirectory(prefix="zsad-eval-") as tmp:
        return _zsad.evaluate(tmp, m, opts, quiet, command)


def calibrate(
    data: Union[None, PathLike, Sequence[PathLike]] = None,
    model: Optional[PathLike] = None,
    out: Optional[PathLike] = None,
    *,
    normal: Union[None, PathLike, Sequence[PathLike]] = None,
    predictions: Optional[PathLike] = None,
    max_fpr: Optional[float] = None,
    min_recall: Optional[float] = None,
    preset: Optional[str] = None,
    adapter: Optional[PathLike] = None,
    quiet: bool = False,
    **options: Any,
) -> Dict[str, Any]:
    """``zsad calibrate``: image and pixel thresholds for :class:`Detector` and
    :func:`detect_folder` (``thresholds=``), chosen on labelled data (F1-max by default,
    ``max_fpr`` or ``min_recall``) or on normal images only (``normal=``, with ``max_fpr``).

    Args:
        data: labelled data, any layout :func:`evaluate` reads.
        model: as for :class:`Detector` (or give ``predictions``).
        out: the thresholds file to write (``thresholds.json``); without it the thresholds are
            only returned (pass ``out=`` to use them with ``thresholds=``).
        normal: normal images (files or folders) instead of ``data``.
        predictions: a ``detect_folder`` run over ``data`` instead of running a model.
        max_fpr: the lowest thresholds whose false-positive rate is at most this.
        min_recall: the highest thresholds whose recall is at least this.
        **options: every other option of ``zsad calibrate`` (``class_name``, ``reference`` ...).

    Returns:
        The thresholds file as a dict: ``image`` and ``pixel`` (each ``threshold``, ``rule``,
        ``achieved``; ``None`` when none could be chosen, with a warning), ``model``, ``data``.
    """
    opts = _options(data=data, normal=normal, predictions=predictions, max_fpr=max_fpr,
                    min_recall=min_recall, preset=preset, adapter=adapter, **options)
    m = None if model is None else os.fsdecode(os.fspath(model))
    if out is not None:
        file, why = _zsad.calibrate(os.fspath(out), m, opts, quiet)
    else:
        with tempfile.TemporaryDirectory(prefix="zsad-calibrate-") as tmp:
            file, why = _zsad.calibrate(os.path.join(tmp, "thresholds.json"), m, opts, quiet)
    if why is not None and not quiet:
        warnings.warn(why, stacklevel=2)
    return file


def info(
    model: PathLike,
    *,
    device: Optional[str] = None,
    precision: Optional[str] = None,
    dtype: Optional[str] = None,
    activation: Optional[str] = None,
) -> Dict[str, Any]:
    """``zsad info``: what a model is, as ``zsad info --json`` prints it: ``source``,
    ``naming``, ``config`` (the CLIP configuration), ``grid``, ``vision_parameters``,
    ``text_parameters``, ``tokenizer`` and ``gemm`` (the GEMM the backbone runs on, for this
    ``device`` and ``precision``)."""
    return _zsad.info(os.fsdecode(os.fspath(model)),
                      _options(device=device, precision=precision, dtype=dtype,
                               activation=activation))


def read_image(path: PathLike, *, max_pixels: Optional[int] = None) -> np.ndarray:
    """An image file decoded exactly as ``zsad detect`` decodes its inputs: regular files only,
    within ``max_pixels`` (default 40 megapixels), EXIF orientation applied, 16-bit samples
    scaled (``v / 257``, rounded), grey replicated and alpha dropped.

    Returns:
        A ``uint8`` array of shape ``(height, width, 3)`` (RGB): ``detector.detect(array)``
        gives the numbers of ``detector.detect(path)``. An array decoded by another library
        can differ slightly (JPEG decoders in particular do not agree to the last bit), and so
        can its scores.

    Raises:
        InputError, MissingFileError, FileError: as :meth:`Detector.detect` for a path.
    """
    return _zsad.read_image(os.fspath(path), max_pixels)
