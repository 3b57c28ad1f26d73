"""What `Detector.detect` takes: paths, numpy arrays and PIL images give the same numbers;
everything else is a clear exception with zsad's message."""

import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

import zsad

from conftest import rgb


def test_path_numpy_and_pil_agree(detector, images):
    for p in images:
        a = np.asarray(Image.open(p))
        results = [
            detector.detect(p),
            detector.detect(os.fspath(p)),
            detector.detect(os.fsencode(p)),
            detector.detect(a),
            detector.detect(Image.open(p)),
            detector.detect(np.asfortranarray(a)),  # any memory layout
            detector.detect(np.ascontiguousarray(a[:, ::-1])[:, ::-1]),  # negative strides
            detector.detect(Image.open(p).convert("RGBA")),  # alpha dropped, as for files
        ]
        for r in results:
            assert r.score == results[0].score
            assert np.array_equal(r.map, results[0].map)
        assert results[0].source == str(p) and results[3].source is None


def test_detection_reads_well(detector, images):
    r = detector.detect(images[0])
    assert repr(r).startswith("Detection(score=")
    d = r.to_dict()
    assert d["path"] == str(images[0]) and d["width"] == r.width and "anomalous" not in d
    assert r.map.flags.writeable and r.map.shape == (r.height, r.width)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((20, 30, 3), np.uint16), ["uint16", "8-bit RGB", "/ 257"]),
        (np.zeros((20, 30, 3), np.float32), ["float32", "8-bit RGB", "* 255"]),
        (np.zeros((20, 30, 3), np.float64), ["float64", "8-bit RGB"]),
        (np.full((20, 30, 3), np.nan), ["NaN", "8-bit RGB"]),
        (np.zeros((20, 30), np.uint8), ["(20, 30)", "grey", "np.stack"]),
        (np.zeros((20, 30, 4), np.uint8), ["(20, 30, 4)", "RGBA", "a[..., :3]"]),
        (np.zeros((20, 30, 1), np.uint8), ["(20, 30, 1)", "(height, width, 3)"]),
        (np.zeros((2, 20, 30, 3), np.uint8), ["(2, 20, 30, 3)"]),
        (np.zeros((0, 30, 3), np.uint8), ["empty", "no pixels"]),
        (np.zeros((2, 400, 3), np.uint8), ["400x2", "elongated"]),
        (np.zeros((20, 30, 3), bool), ["bool"]),
    ],
)
def test_bad_arrays_are_input_errors(detector, array, words):
    with pytest.raises(zsad.InputError) as e:
        detector.detect(array)
    assert isinstance(e.value, ValueError) and isinstance(e.value, zsad.ZsadError)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert str(e.value).startswith("image")


def test_max_pixels_holds_for_arrays_as_for_files(images):
    det = zsad.Detector("random:tiny", max_pixels=1000, quiet=True)
    with pytest.raises(zsad.InputError, match=r"image: 40x30 = 1200 pixels is over the budget of 1000 \(max_pixels=;") as e:
        det.detect(np.zeros((30, 40, 3), np.uint8))
    assert e.value.filename is None
    with pytest.raises(zsad.InputError, match="83x61 = 5063 pixels is over the budget of 1000") as e:
        det.detect(images[0])
    assert e.value.filename == str(images[0])
    det.detect(np.zeros((25, 40, 3), np.uint8))


def test_missing_files_folders_and_fifos(detector, tmp_path):
    missing = tmp_path / "no-such.png"
    with pytest.raises(zsad.MissingFileError) as e:
        detector.detect(missing)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, zsad.FileError)
    assert str(missing) in str(e.value) and e.value.filename == str(missing)
    with pytest.raises(zsad.FileError, match="a folder: only regular files are read") as e:
        detector.detect(tmp_path)
    assert not isinstance(e.value, FileNotFoundError) and isinstance(e.value, OSError)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(zsad.FileError, match="FIFO"):
        detector.detect(fifo)  # refused, never waited on
    assert time.monotonic() - started < 10
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(zsad.InputError, match="not an image: unrecognised file signature") as e:
        detector.detect(junk)
    assert e.value.filename == str(junk)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(zsad.InputError, match=r"empty file \(0 bytes\)"):
        detector.detect(empty)


def test_other_objects_are_type_errors(detector):
    for bad in (42, None, [[1, 2, 3]], {"a": 1}):
        with pytest.raises(TypeError, match="a path, a numpy uint8 array"):
            detector.detect(bad)


def test_batch_errors_name_the_input(detector, images, tmp_path):
    good = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(zsad.InputError, match=r"^images\[1\]: a float64 array"):
        detector.detect_batch([good, np.zeros((20, 30, 3))])
    with pytest.raises(zsad.MissingFileError, match="gone.png"):
        detector.detect_batch([images[0], tmp_path / "gone.png"])
    # Counted across passes.
    with pytest.raises(zsad.InputError, match=r"^images\[9\]: an array of shape \(20, 30\)"):
        detector.detect_batch([good] * 9 + [good[..., 0]], batch_size=4)
    with pytest.raises(zsad.OptionError, match=r"^batch_size=-1: must be an integer >= 0"):
        detector.detect_batch([good], batch_size=-1)
    assert detector.detect_batch([]) == []
    # Any iterable, mixed kinds.
    out = detector.detect_batch(iter([images[1], good, Image.fromarray(good)]))
    assert [o.source for o in out] == [str(images[1]), None, None]
    # A generator is consumed a pass at a time.
    seen = []

    def frames():
        for i in range(10):
            seen.append(i)
            yield good

    out = detector.detect_batch(frames(), batch_size=3)
    assert len(out) == 10 and seen == list(range(10))


def test_the_gil_is_released_while_the_model_runs(detector):
    batch = [rgb(200, 200, seed=i) for i in range(24)]
    done = threading.Event()
    result = []

    def work():
        result.append(detector.detect_batch(batch, batch_size=8))
        done.set()

    t = threading.Thread(target=work)
    ticks = 0
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    assert len(result[0]) == 24
    # With the GIL held for the whole call this thread could not have run in between.
    assert ticks > 5, ticks
