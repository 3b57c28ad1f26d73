"""Options are checked as `zsad detect` checks them, and refused with zsad's messages, the
options named as keyword arguments."""

import math
import pydoc

import numpy as np
import pytest

import zsad


def refused(match, exc=zsad.OptionError, **kwargs):
    with pytest.raises(exc, match=match) as e:
        zsad.Detector("random:tiny", quiet=True, **kwargs)
    return e.value


def test_batch_size_is_refused_naming_it(detector):
    e = refused(r"^batch_size=300: at most 256", batch_size=300)
    assert isinstance(e, ValueError) and isinstance(e, zsad.ZsadError)
    with pytest.raises(zsad.OptionError, match=r"^batch_size=300: at most 256"):
        detector.detect_batch([np.zeros((8, 8, 3), np.uint8)], batch_size=300)
    with pytest.raises(zsad.OptionError, match=r"^batch_size=-1: must be an integer >= 0"):
        zsad.Detector("random:tiny", batch_size=-1)
    refused(r"batch_size=2.5: must be an integer, not float", batch_size=2.5)
    refused(r"batch_size=True: must be an integer, not bool", batch_size=True)
    # NumPy integers are integers.
    zsad.Detector("random:tiny", batch_size=np.int64(4), quiet=True)


def test_values_and_rules_as_the_cli_words_them():
    refused(r"^threshold=NaN: scores are in \[0, 1\]", threshold=math.nan)
    refused(r"^threshold=1.5: scores are in \[0, 1\]", threshold=1.5)
    refused(r"^pixel_threshold=-0.1: map values are in \[0, 1\]", pixel_threshold=-0.1)
    refused(r"^joint_alpha=2: must be in \[0, 1\]", joint_alpha=2)
    refused(r"^joint_alpha= weighs the `mean` joint score, but this run's is Max: set joint='mean'",
            joint="max", joint_alpha=0.3)
    refused(r"^min_region_area= sizes defect regions: add pixel_threshold=P", min_region_area=5)
    refused(r"^force_thresholds= goes with thresholds=", force_thresholds=True)
    refused(r"^force_adapter= goes with adapter=", force_adapter=True)
    refused(r"^thresholds= sets the image and pixel thresholds: drop threshold= and pixel_threshold=",
            thresholds="t.json", threshold=0.5)
    refused(r"^dtype='bf16' needs device='cuda': on the CPU use precision='bf16'", dtype="bf16")
    refused(r"^max_pixels=0: must be in 1..=", max_pixels=0)
    refused(r"^reference_weight= weighs the reference map: add reference=PATH\.\.\.",
            reference_weight=0.5)
    refused(r"^image_size=33 is not a multiple of the model's 8 px patch .*; use 32 or 40",
            image_size=33)
    refused(r"^class_name= is empty", class_name=" ")


def test_choices_list_their_names():
    refused(r"^preset='winclip': must be one of zero-shot, adaclip, anomalyclip, headclip, zsad",
            preset="winclip")
    refused(r"^device='tpu': must be one of cpu, cuda", device="tpu")
    refused(r"^precision='f16': must be one of f32, bf16", precision="f16")
    refused(r"^activation='relu': must be one of quick-gelu, gelu", activation="relu")
    refused(r"^preset=3: must be a str, not int", preset=3)


def test_unknown_and_misplaced_keywords_are_type_errors():
    with pytest.raises(TypeError, match=r"Detector\(\) got an unexpected keyword argument 'batchsize'"):
        zsad.Detector("random:tiny", batchsize=4)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'out' \(it names files to write: use zsad.detect_folder"):
        zsad.Detector("random:tiny", out="somewhere")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'maps'"):
        zsad.Detector("random:tiny", maps="npy")
    with pytest.raises(TypeError, match=r"detect_folder\(\) got an unexpected keyword argument 'nope'"):
        zsad.detect_folder(".", "random:tiny", nope=1)


def test_models_devices_and_files_that_cannot_be_used(tmp_path):
    with pytest.raises(zsad.ModelError, match="cannot load model `no/such-model-here` *:|no/such-model-here"):
        zsad.Detector(str(tmp_path / "no" / "such-model-here"), quiet=True)
    with pytest.raises(zsad.OptionError, match="^model= is empty"):
        zsad.Detector("", quiet=True)
    try:
        zsad.Detector("random:tiny", device="cuda", quiet=True)
    except zsad.DeviceError as e:
        assert "device='cuda'" in str(e)
    with pytest.raises(zsad.MissingFileError):
        zsad.Detector("random:tiny", thresholds=tmp_path / "none.json", quiet=True)
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    with pytest.raises(zsad.OutputError, match="not a thresholds file written by `zsad calibrate`"):
        zsad.Detector("random:tiny", thresholds=bad, quiet=True)
    with pytest.raises(zsad.MissingFileError):
        zsad.Detector("random:tiny", adapter=tmp_path / "none.safetensors", quiet=True)


def test_version_info_and_gemm(cli, detector):
    assert zsad.__version__ == zsad._zsad.__version__
    out = cli("--version").stdout.split()
    assert out[-1] == zsad.__version__
    from importlib.metadata import version

    assert version("zsad") == zsad.__version__
    i = zsad.info("random:tiny")
    assert i["naming"] == "random" and i["grid"] > 0 and i["gemm"]
    assert i["vision_parameters"] > 0 and i["config"]["vision_config"]["patch_size"] > 0
    assert detector.info() == i
    assert detector.gemm == i["gemm"]
    assert detector.image_size == i["config"]["vision_config"]["image_size"]
    assert detector.settings["model"]["random"] == "tiny"
    with pytest.raises(zsad.OptionError, match="^precision='f64'"):
        zsad.info("random:tiny", precision="f64")


def test_help_is_useful():
    text = pydoc.render_doc(zsad.Detector, renderer=pydoc.plaintext)
    for w in ("detect_batch", "batch_size", "uint8", "PIL", "threshold", "Raises", "GIL"):
        assert w in text, w
    assert "zsad detect" in pydoc.render_doc(zsad.detect_folder, renderer=pydoc.plaintext)
    assert "metrics" in pydoc.render_doc(zsad.evaluate, renderer=pydoc.plaintext)
    assert "OptionError" in zsad._errors.__doc__
    r = zsad._zsad.render_options
    assert r("see `batch_size` and `zsad eval`") == "see batch_size= and `zsad eval`"
    assert r("`batch_size` 4 starts there; `out` DIR (a folder)") == \
        "batch_size=4 starts there; out=DIR (a folder)"
    assert r("`heatmaps` none, `heatmap_scale` run: use `maps` png") == \
        "heatmaps='none', heatmap_scale='run': use maps='png'"
    assert r("`max_fpr` and `min_recall` exclude each other") == \
        "max_fpr= and min_recall= exclude each other"


def test_typing_files_are_installed():
    from pathlib import Path

    pkg = Path(zsad.__file__).parent
    assert (pkg / "py.typed").is_file() and (pkg / "_zsad.pyi").is_file()
