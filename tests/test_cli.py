"""The fxslim command: inspect on real models, JSON output, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fxslim.cli import main


def test_cli_inspect_mobilenet_v2_reports_52_convs_34_pointwise():
    script = Path(sys.executable).parent / "fxslim"
    out = subprocess.run([str(script), "inspect", "torchvision:mobilenet_v2", "--input", "1x3x224x224"],
                         capture_output=True, text=True, check=True)
    assert "52 convs, of which 34 pointwise and 17 depthwise; 1 linear" in out.stdout


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
    assert "not traced whole: <root>" in out and "2 convs, of which 1 pointwise" in out


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
