"""`detect_folder`, `evaluate` and `calibrate` are the library's jobs: the same results and the
same files as `zsad detect`, `zsad eval` and `zsad calibrate`."""

import _thread
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import zsad

from conftest import REPO, records, rgb, save_png


def tree(folder: Path):
    """Every file under `folder` (relative) with its bytes, `run.json` left out (it records
    the command and the time)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run.json"
    }


def test_detect_folder_writes_the_files_the_cli_writes(cli, images, tmp_path):
    folder = images[0].parent
    extra = dict(threshold=0.25, pixel_threshold=0.3, maps="npy")
    cli("detect", folder, "--model", "random:tiny", "--out", tmp_path / "cli", "-q",
        "--threshold", "0.25", "--pixel-threshold", "0.3", "--maps", "npy")
    run = zsad.detect_folder(folder, "random:tiny", out=tmp_path / "py", quiet=True, **extra)
    want, got = tree(tmp_path / "cli"), tree(tmp_path / "py")
    assert sorted(got) == sorted(want)
    assert any(k.startswith("heatmaps/") for k in got) and any(k.startswith("masks/") for k in got)
    for k in want:
        assert got[k] == want[k], k
    assert run["scored"] == 3 and run["failed"] == 0
    assert run["records"] == records(tmp_path / "py")
    assert run["records_file"] == str(tmp_path / "py" / "scores.jsonl")
    settings = json.loads((tmp_path / "py" / "run.json").read_text())
    cli_settings = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert settings["settings"] == cli_settings["settings"]
    assert "zsad.detect_folder(" in settings["info"]["command"][-1]

    # A second run into the same folder is refused as the CLI refuses it ...
    with pytest.raises(zsad.OutputError, match="pass resume= to continue that run or overwrite="):
        zsad.detect_folder(folder, "random:tiny", out=tmp_path / "py", quiet=True, **extra)
    # ... and resumes.
    again = zsad.detect_folder(folder, "random:tiny", out=tmp_path / "py", resume=True,
                               quiet=True, **extra)
    assert again["already_done"] == 3 and again["scored"] == 0


def test_detect_folder_without_out_returns_records_and_writes_nothing(detector, images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    run = zsad.detect_folder([images[0], images[1], bad], "random:tiny", quiet=True)
    by_path = {r["path"]: r for r in run["records"]}
    assert run["scored"] == 2 and run["failed"] == 1 and run["records_file"] is None
    assert "not an image" in by_path[str(bad)]["error"]
    assert by_path[str(images[0])]["score"] == detector.detect(images[0]).score
    assert list(tmp_path.iterdir()) == [bad]
    with pytest.raises(zsad.OptionError, match=r"needs an output folder: set out=DIR"):
        zsad.detect_folder(images[0], "random:tiny", maps="npy", quiet=True)
    with pytest.raises(zsad.OptionError, match="no such file or folder"):
        zsad.detect_folder(tmp_path / "typo", "random:tiny", quiet=True)
    with pytest.raises(zsad.OptionError, match=r"^shard='3': `3` is not K/N \(e.g. 0/4\)"):
        zsad.detect_folder(images[0], "random:tiny", shard="3", quiet=True)


def test_evaluate_equals_the_cli(cli, dataset, tmp_path):
    cli("eval", "--data", dataset, "--model", "random:tiny", "--out", tmp_path / "cli", "-q")
    want = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    got = zsad.evaluate(dataset, "random:tiny", out=tmp_path / "py", quiet=True)
    assert got.pop("images") == 8 and got.pop("seconds") >= 0
    assert got == want
    assert json.loads((tmp_path / "py" / "metrics.json").read_text()) == want
    assert sorted(p.name for p in (tmp_path / "py").iterdir()) == \
        sorted(p.name for p in (tmp_path / "cli").iterdir())
    # Without out: a temporary folder, the same metrics.
    again = zsad.evaluate([dataset], "random:tiny", quiet=True)
    again.pop("images"), again.pop("seconds")
    assert again == want
    # From a detect_folder run's records and maps.
    zsad.detect_folder(dataset / "test", "random:tiny", out=tmp_path / "run", maps="npy",
                       heatmaps="none", quiet=True)
    from_run = zsad.evaluate(dataset, predictions=tmp_path / "run", quiet=True)
    assert from_run["mean"]["image_auroc"] == pytest.approx(want["mean"]["image_auroc"], abs=1e-6)
    with pytest.raises(zsad.OptionError, match="predictions= evaluates a finished detect run"):
        zsad.evaluate(dataset, "random:tiny", predictions=tmp_path / "run")


def test_a_bad_dataset_is_a_dataset_error(tmp_path):
    (tmp_path / "cls" / "test" / "good").mkdir(parents=True)
    (tmp_path / "cls2" / "test" / "good").mkdir(parents=True)
    save_png(tmp_path / "cls" / "test" / "good" / "000.png", rgb(16, 16, 0))
    with pytest.raises(zsad.DatasetError, match="has no images"):
        zsad.evaluate(tmp_path, "random:tiny", quiet=True)


def test_calibrate_equals_the_cli_and_its_thresholds_drive_the_detector(cli, dataset, tmp_path):
    cli("calibrate", "--data", dataset, "--model", "random:tiny", "--out", tmp_path / "cli.json", "-q")
    want = json.loads((tmp_path / "cli.json").read_text())
    got = zsad.calibrate(dataset, "random:tiny", out=tmp_path / "py.json", quiet=True)
    for k in ("format", "image", "pixel", "model"):
        assert got[k] == want[k], k
    assert json.loads((tmp_path / "py.json").read_text())["image"] == want["image"]
    assert zsad.calibrate(dataset, "random:tiny", quiet=True)["image"] == want["image"]

    det = zsad.Detector("random:tiny", thresholds=tmp_path / "py.json", quiet=True)
    assert det.threshold == pytest.approx(want["image"]["threshold"])
    img = dataset / "test" / "crack" / "000.png"
    r = det.detect(img)
    assert r.anomalous == (np.float32(r.score) >= np.float32(want["image"]["threshold"]))
    if want["pixel"] is not None:
        assert r.mask is not None and r.mask.shape == r.map.shape
    # The same thresholds with other settings are refused, naming what differs ...
    with pytest.raises(zsad.MismatchError, match="were calibrated with other settings") as e:
        zsad.Detector("random:tiny", thresholds=tmp_path / "py.json", class_name="screw", quiet=True)
    assert e.value.filename == str(tmp_path / "py.json")
    assert "force_thresholds=" in str(e.value)
    # ... unless forced.
    zsad.Detector("random:tiny", thresholds=tmp_path / "py.json", class_name="screw",
                  force_thresholds=True, quiet=True)

    normal = zsad.calibrate(normal=dataset / "test" / "good", model="random:tiny", max_fpr=0.25,
                            quiet=True)
    assert normal["image"]["rule"] == "normal-max-fpr"
    with pytest.raises(zsad.OptionError, match="^normal= needs max_fpr=F"):
        zsad.calibrate(normal=dataset / "test" / "good", model="random:tiny", quiet=True)
    with pytest.raises(zsad.OptionError, match="^max_fpr=1.5: must be a number from 0 to 1"):
        zsad.calibrate(dataset, "random:tiny", max_fpr=1.5, quiet=True)
    with pytest.raises(zsad.OptionError, match="exclude each other"):
        zsad.calibrate(dataset, "random:tiny", normal=dataset, max_fpr=0.1, quiet=True)


def test_mvtec_bottle_from_shared_when_present(tmp_path):
    bottle = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
    if not (bottle / "test").is_dir():
        pytest.skip(f"SKIP: no MVTec AD bottle at {bottle} (the synthetic dataset tests ran)")
    rows = ["image,mask,label,class"]
    for kind in ("good", "broken_large"):
        for i in range(2):
            img = bottle / "test" / kind / f"{i:03d}.png"
            mask = bottle / "ground_truth" / kind / f"{i:03d}_mask.png"
            rows.append(f"{img},{mask if kind != 'good' else ''},{int(kind != 'good')},bottle")
    manifest = tmp_path / "bottle.csv"
    manifest.write_text("\n".join(rows) + "\n")
    m = zsad.evaluate(manifest, "random:tiny", quiet=True)
    assert m["images"] == 4 and "bottle" in json.dumps(m)


def interrupt_after(seconds):
    """Simulates Ctrl-C in the main thread after `seconds`."""
    t = threading.Timer(seconds, _thread.interrupt_main)
    t.start()
    return t


def test_ctrl_c_stops_long_calls(detector, tmp_path):
    image = rgb(300, 300, seed=1)
    batch = [image] * 4000  # about 10 s of work at 2 ms an image
    started = time.monotonic()
    t = interrupt_after(0.3)
    with pytest.raises(KeyboardInterrupt):
        detector.detect_batch(batch, batch_size=1)
    t.join()
    assert time.monotonic() - started < 5
    # The stop request is cleared: the detector goes on working.
    assert detector.detect(image).map.shape == (300, 300)

    # A folder run stops between inputs, keeping what it wrote, and resumes.
    folder = tmp_path / "many"
    folder.mkdir()
    first = save_png(folder / "0000.png", rgb(512, 512, seed=2))
    n = 3000
    for i in range(1, n):
        os.link(first, folder / f"{i:04d}.png")
    # The model is built in about 0.4 s, then 2-10 ms an image: 6-30 s of work in all, so the
    # interrupt lands mid-run on a fast machine too (400 images once finished before it).
    t = interrupt_after(1.2)
    with pytest.raises(KeyboardInterrupt, match="the same command with resume= continues"):
        zsad.detect_folder(folder, "random:tiny", out=tmp_path / "out", batch_size=1,
                           maps="none", heatmaps="none", quiet=True)
    t.join()
    done = records(tmp_path / "out")
    assert 0 < len(done) < n
    rest = zsad.detect_folder(folder, "random:tiny", out=tmp_path / "out", batch_size=1,
                              maps="none", heatmaps="none", resume=True, quiet=True)
    assert rest["already_done"] == len(done) and rest["scored"] == n - len(done)
