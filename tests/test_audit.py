"""`robustcnn audit`: every model format, safe loading, validation, verdicts and exit codes.

The models are real: the session's trained lenet5 (~97% clean) saved as TorchScript, ONNX,
safetensors, a torch.save state dict, and logged to a temporary MLflow store. Audits run on 64
images with short attacks (TINY_AUDIT); the exit-code contract is checked through the real CLI.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from robustcnn.deployed import formats
from robustcnn.deployed.loading import load_model_file
from robustcnn.deployed.onnx_torch import OnnxModule, UnsupportedOnnx
from robustcnn.errors import ModelError, RobustCNNError
from robustcnn.jobs.audit import run_audit

# torch 2.13 deprecates TorchScript; deployed models still ship in it, so the audit must read it
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")

TINY_AUDIT = (
    "audit.n_samples=64",
    "threat.eps=[0,0.1,0.3]",
    "attack.apgd.steps=10",
    "attack.square.queries=100",
    "checks.probe_samples=32",
    "training.epochs=1",  # the transfer surrogate of black-box audits
)


def export_onnx(model: nn.Module, path: Path, shape: tuple[int, ...] = (1, 28, 28)) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.rand(2, *shape),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
        )
    return path


class QuantizedInput(nn.Module):
    """Input quantisation in front of a classifier: a textbook gradient-masking 'defense'."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 4) / 4)  # zero gradient almost everywhere


class FiveClasses(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :5]


class NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * float("nan")


class Payload:
    """A malicious pickle: unpickling it creates a marker file (a stand-in for any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model_files(trained_lenet, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The trained lenet5 in every format an audit accepts (plus some it must refuse)."""
    root = tmp_path_factory.mktemp("models")
    model = trained_lenet.eval()
    example = torch.rand(2, 1, 28, 28)
    files = {
        "torchscript": root / "lenet.pt",
        "safetensors": root / "lenet.safetensors",
        "state_dict": root / "lenet_state.pth",
        "onnx": export_onnx(model, root / "lenet.onnx"),
        "pickled_module": root / "lenet_full.pt",
        "masked": root / "masked.pt",
        "five_classes": root / "five.pt",
        "nan": root / "nan.pt",
    }
    torch.jit.save(torch.jit.trace(model, example), files["torchscript"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, files["safetensors"])
    torch.save(model.net.state_dict(), files["state_dict"])  # a bare network, no "net." prefix
    torch.save(model, files["pickled_module"])
    torch.jit.save(torch.jit.trace(QuantizedInput(model), example), files["masked"])
    torch.jit.save(torch.jit.script(FiveClasses()), files["five_classes"])
    torch.jit.save(torch.jit.script(NaNModel()), files["nan"])
    return files


def audit(source: Path | str, *overrides: str) -> tuple[int, dict]:
    return run_audit(str(source), [*TINY_AUDIT, *overrides])


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "robustcnn.cli", "audit", *args],
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )


# ---------------------------------------------------------------- format detection and the converter


def test_formats_are_sniffed_from_the_bytes(model_files: dict[str, Path], tmp_path: Path) -> None:
    assert formats.sniff(model_files["torchscript"]) == formats.TORCHSCRIPT
    assert formats.sniff(model_files["onnx"]) == formats.ONNX
    assert formats.sniff(model_files["safetensors"]) == formats.SAFETENSORS
    assert formats.sniff(model_files["state_dict"]) == formats.TORCH_SAVE
    renamed = tmp_path / "weights.onnx"  # the extension lies: the bytes decide
    renamed.write_bytes(model_files["torchscript"].read_bytes())
    assert formats.sniff(renamed) == formats.TORCHSCRIPT


@pytest.mark.parametrize(
    ("name", "shape"),
    [("lenet5", (1, 28, 28)), ("mobilenet_v2", (3, 32, 32)), ("resnet18", (3, 32, 32))],
)
def test_onnx_conversion_matches_onnxruntime_and_has_gradients(
    name: str, shape: tuple, tmp_path: Path
) -> None:
    import onnx
    import onnxruntime as ort

    from robustcnn.models import build_model

    torch.manual_seed(0)
    model = build_model(name, input_shape=shape, num_classes=10, mean=[0.5] * shape[0], std=[0.25] * shape[0])
    path = export_onnx(model, tmp_path / f"{name}.onnx", shape)
    converted = OnnxModule(onnx.load(str(path))).eval()
    x = torch.rand(4, *shape, requires_grad=True)
    ours = converted(x)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.detach().numpy()}
    )[0]
    assert torch.allclose(ours.detach(), torch.from_numpy(reference), atol=1e-4, rtol=1e-4)
    (grad,) = torch.autograd.grad(ours.sum(), x)
    assert grad.abs().sum() > 0


def test_onnx_with_an_unknown_operator_is_reported(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NonMaxSuppression", ["x", "x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, 3])],
    )
    with pytest.raises(UnsupportedOnnx, match="NonMaxSuppression"):
        OnnxModule(helper.make_model(graph))
    assert onnx  # the import is the point: onnx is a required dependency


# ---------------------------------------------------------------- audits of every format


@pytest.mark.parametrize("kind", ["torchscript", "onnx", "safetensors", "state_dict"])
def test_each_format_is_audited_white_box(kind: str, model_files: dict[str, Path], isolated: dict) -> None:
    # weights only: the architecture is named (no robustcnn cache sidecar beside these files)
    extra = ("model.arch=lenet5",) if kind in ("safetensors", "state_dict") else ()
    code, results = audit(model_files[kind], *extra)
    assert results["white_box"] is True
    assert results["clean_accuracy"] >= 0.9
    assert results["worst_case_robust_accuracy"][-1] <= 0.05  # an undefended model at eps 0.3
    assert results["verdict"] == "not robust" and code == 0
    # square and noise run last, on what the gradient attacks left (square at eps 0.3: nothing)
    assert set(results["robust_accuracy"]) == {"fgsm", "apgd"} and set(results["follow_ups"]) == {"noise"}
    statuses = {c["name"]: c["status"] for c in results["checks"]}
    assert statuses["white_box_beats_square"] == "skipped" and statuses["white_box_beats_noise"] == "passed"
    assert not [c for c in results["checks"] if c["passed"] is False], results["checks"]
    out = Path(results["out_dir"])
    for name in ("audit.json", "model_card.json", "report.html"):
        assert (out / name).is_file()
    page = (out / "report.html").read_text()
    assert 'id="verdict-table"' in page and "Content-Security-Policy" in page and "not robust" in page
    card = results["model_card"]
    assert card["verdict"] == "not robust" and card["n_samples"] == 64 and card["libraries"]["torch"]
    assert results["model"]["sha256"] and results["model"]["input_shape"] == [1, 28, 28]


def test_all_formats_agree_on_clean_accuracy(model_files: dict[str, Path], isolated: dict) -> None:
    """The same network through four loaders: the same predictions (normalization handled right)."""
    overrides = ("attack=[fgsm]", "audit.white_box_attacks=[fgsm]", "checks.enabled=false")
    weights_only = {"safetensors", "state_dict"}
    audits = {
        kind: audit(model_files[kind], *overrides, *(["model.arch=lenet5"] if kind in weights_only else []))
        for kind in ("torchscript", "onnx", "safetensors", "state_dict")
    }
    accuracies = {kind: results["clean_accuracy"] for kind, (_, results) in audits.items()}
    assert len(set(accuracies.values())) == 1, accuracies
    # checks off: no verdict can be given, and the audit says so with exit code 3 (never 0)
    assert {(code, results["verdict"]) for code, results in audits.values()} == {(3, "unchecked")}


def test_onnx_black_box_uses_query_and_transfer_attacks(model_files: dict[str, Path], isolated: dict) -> None:
    code, results = audit(model_files["onnx"], "audit.onnx=black_box")
    assert results["white_box"] is False and results["evidence"] == "black_box"
    # no gradient attack ran: the gate is refused by default (exit 1), even without a minimum
    assert results["gate"]["refused"] and results["gate"]["passed"] is False, results["gate"]
    assert code == 1 and results["exit_code"] == 1 and results["model_card"]["evidence"] == "black_box"
    eot = next(c for c in results["checks"] if c["name"] == "stochastic_model_eot")
    assert eot["status"] == "skipped", eot
    assert set(results["robust_accuracy"]) == {"square", "transfer", "noise"}
    gradients = next(c for c in results["checks"] if c["name"] == "gradients_nonzero_finite")
    assert gradients["passed"] is None  # no gradients to check: skipped, not passed
    assert results["worst_case_robust_accuracy"][-1] < results["clean_accuracy"] - 0.3
    assert any("black_box" in note for note in results["notes"])


def test_mlflow_models_by_run_and_registry_uri(
    trained_lenet, model_files: dict[str, Path], isolated: dict
) -> None:
    import mlflow

    mlflow.set_tracking_uri(isolated["store"])
    mlflow.set_experiment("deployed")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(model_files["onnx"]), "exported")
        mlflow.log_artifact(str(model_files["torchscript"]), "scripted")
    onnx_uri = f"runs:/{run.info.run_id}/exported/lenet.onnx"
    code, results = audit(onnx_uri)
    assert code == 0 and results["white_box"] and results["model"]["format"] == "onnx"
    assert results["model"]["source"] == onnx_uri

    scripted = torch.jit.load(str(model_files["torchscript"]))
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            scripted,
            name="lenet",
            serialization_format="pickle",
            pip_requirements=[],
            registered_model_name="lenet-prod",
        )
    assert info.registered_model_version is not None
    code, results = audit("models:/lenet-prod/1")
    assert (
        code == 0
        and results["model"]["format"] == "torchscript"
        and results["model"]["name"] == "lenet-prod-v1"
    )

    # mlflow 3's default for a plain module: a torch.export program (pt2), loaded without unpickling
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            trained_lenet,
            name="exported",
            input_example=torch.rand(4, 1, 28, 28).numpy(),
            pip_requirements=[],
            registered_model_name="lenet-pt2",
        )
    code, results = audit("models:/lenet-pt2/1")
    assert code == 0 and results["model"]["format"] == "exported_program" and results["white_box"]
    assert results["worst_case_robust_accuracy"][-1] <= 0.05


def test_pickled_mlflow_pytorch_model_is_refused(trained_lenet, isolated: dict) -> None:
    import mlflow

    mlflow.set_tracking_uri(isolated["store"])
    mlflow.set_experiment("deployed")
    with mlflow.start_run():
        mlflow.pytorch.log_model(
            trained_lenet,
            name="pickled",
            serialization_format="pickle",
            pip_requirements=[],
            registered_model_name="pickled",
        )
    with pytest.raises(ModelError, match="pickled Python object.*allow_pickle"):
        audit("models:/pickled/1")


# ---------------------------------------------------------------- safety


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path, isolated: dict) -> None:
    marker = tmp_path / "pwned"
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    zipped = tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, zipped)
    for path in (raw, zipped):
        with pytest.raises(ModelError, match="pickled Python object"):
            load_model_file(path)
        result = cli(str(path), *TINY_AUDIT, cwd=isolated["root"])
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and "allow_pickle" in result.stderr
    assert not marker.exists()


def test_a_pickled_full_model_loads_only_with_the_explicit_opt_in(
    model_files: dict[str, Path], isolated: dict
) -> None:
    with pytest.raises(ModelError, match="allow_pickle=true"):
        audit(model_files["pickled_module"])
    code, results = audit(
        model_files["pickled_module"],
        "audit.allow_pickle=true",
        "attack=[fgsm]",
        "audit.white_box_attacks=[fgsm]",
        "checks.enabled=false",
    )
    assert results["model"]["format"] == "pickled_module" and results["clean_accuracy"] >= 0.9


# ---------------------------------------------------------------- verdicts and exit codes


@pytest.mark.slow
def test_gradient_masked_model_is_unreliable_with_exit_code_3(
    model_files: dict[str, Path], isolated: dict
) -> None:
    result = cli(str(model_files["masked"]), *TINY_AUDIT, cwd=isolated["root"])
    assert result.returncode == 3, result.stdout + result.stderr
    assert "verdict=unreliable" in result.stdout
    import json

    audit_json = json.loads((isolated["root"] / "reports/audit/masked/audit.json").read_text())
    failed = {c["name"] for c in audit_json["checks"] if c["passed"] is False}
    assert "gradients_nonzero_finite" in failed


@pytest.mark.slow
def test_gate_below_threshold_exits_1_and_verdict_printed(
    model_files: dict[str, Path], isolated: dict
) -> None:
    result = cli(
        str(model_files["torchscript"]), *TINY_AUDIT, "audit.min_robust_accuracy=0.5", cwd=isolated["root"]
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "gate=failed" in result.stdout and "verdict=not_robust" in result.stdout
    result = cli(
        str(model_files["torchscript"]),
        *TINY_AUDIT,
        "audit.min_robust_accuracy=0.5",
        "audit.gate_eps=0",
        cwd=isolated["root"],
    )
    assert result.returncode == 0 and "gate=passed" in result.stdout  # at eps 0 the gate is clean accuracy


def test_black_box_evidence_refuses_the_gate_unless_accepted() -> None:
    """The gate's rule on its own: black-box evidence is refused (exit 1) whatever the accuracy,
    unless audit.accept_black_box=true; an unchecked evaluation exits 3 whatever the gate."""
    from dataclasses import replace

    from robustcnn.jobs.audit import EXIT_BELOW_GATE, EXIT_UNRELIABLE, AuditSettings, exit_code, gate_result

    gated = replace(AuditSettings(), min_robust_accuracy=0.5)
    eps, worst = [0.0, 0.3], [0.99, 0.9]
    refused = gate_result(gated, eps, worst, 0.3, "black_box")
    assert refused["passed"] is False and "accept_black_box" in refused["refused"]
    assert exit_code("not robust", refused) == EXIT_BELOW_GATE
    accepted = gate_result(replace(gated, accept_black_box=True), eps, worst, 0.3, "black_box")
    assert accepted["passed"] is True and accepted["refused"] is None
    assert exit_code("robust", accepted) == 0
    assert gate_result(gated, eps, worst, 0.3, "white_box")["passed"] is True
    assert exit_code("unchecked", accepted) == EXIT_UNRELIABLE


BAD_INPUTS = [
    ("missing file", "nope.pt", (), "does not exist"),
    ("empty file", "empty.pt", (), "empty"),
    ("truncated torchscript", "truncated.pt", (), "damaged or truncated"),
    ("not a model", "notes.txt", (), "not a model file"),
    ("weights without arch", "state_dict", (), "model.arch=NAME"),
    ("wrong arch", "state_dict", ("model.arch=madry_cnn",), "do not fit model.arch=madry_cnn"),
    ("unknown arch", "state_dict", ("model.arch=alexnet",), "unknown model"),
    (
        "input shape",
        "onnx",
        ("data=cifar10_samples", "threat=cifar_linf", "threat.reference_eps=null"),
        "expects inputs shaped",
    ),
    ("class count", "five_classes", (), "5"),
    ("non-finite output", "nan", (), "non-finite"),
    ("negative sample count", "torchscript", ("audit.n_samples=-1",), "audit.n_samples"),
    ("gate out of range", "torchscript", ("audit.min_robust_accuracy=2",), "audit.min_robust_accuracy"),
    ("gate eps not evaluated", "torchscript", ("audit.gate_eps=0.2",), "audit.gate_eps"),
    ("unknown onnx mode", "onnx", ("audit.onnx=maybe",), "audit.onnx"),
    ("unknown dataset", "torchscript", ("data=nope",), "data"),
    ("bad normalization", "torchscript", ("audit.normalization=foo",), "audit.normalization"),
    (
        "no applicable attack",
        "onnx",
        ("audit.onnx=black_box", "audit.black_box_attacks=[fgsm]"),
        "applies to this black-box",
    ),
    ("unknown mlflow run", "runs:/0123456789abcdef/model.onnx", (), "cannot fetch"),
]


@pytest.mark.parametrize(
    ("case", "source", "overrides", "message"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_one_clear_error(
    case: str, source: str, overrides: tuple, message: str, model_files: dict[str, Path], isolated: dict
) -> None:
    root = isolated["root"]
    (root / "empty.pt").write_bytes(b"")
    (root / "notes.txt").write_text("not a model\n" * 10)
    (root / "truncated.pt").write_bytes(model_files["torchscript"].read_bytes()[:2000])
    path = str(model_files.get(source, source))
    with pytest.raises(RobustCNNError) as caught:
        audit(path, *overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_bad_input_through_the_cli_exits_2_without_traceback_and_keeps_earlier_results(
    model_files: dict[str, Path], isolated: dict
) -> None:
    root = isolated["root"]
    good = cli(str(model_files["torchscript"]), *TINY_AUDIT, "audit.out_dir=out", cwd=root)
    assert good.returncode == 0, good.stderr
    before = (root / "out/audit.json").read_bytes()
    for args in (
        ("nope.pt",),
        (str(model_files["state_dict"]), "audit.out_dir=out"),
        (str(model_files["torchscript"]), "data=nope"),
    ):
        bad = cli(*args, *TINY_AUDIT, cwd=root)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert "Traceback" not in bad.stderr and bad.stderr.startswith("robustcnn: error:")
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert (root / "out/audit.json").read_bytes() == before
    missing = cli(cwd=root)
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("the following arguments are required: model")


# ---------------------------------------------------------------- the acceptance pair: defended vs undefended

#: An adversarially trained lenet5: PGD adversarial training as the mnist_defenses preset trains it
#: (constant Adam 3e-3, batch 100, no shifts) for 4 epochs instead of 12, with PGD-5 (step 2.5 eps / 5)
#: instead of PGD-10: 60.7% worst-case robust at eps 0.3 under this test's audit (300 test images;
#: PGD-10 gave 64.0%), well above the 0.5 gate, in 43 s of training on 2 cores instead of 75 s.
PGD_AT = (
    "defense=pgd_at",
    "defense.steps=5",
    "defense.warmup_epochs=1",
    "training.epochs=4",
    "training.batch_size=100",
    "training.optimizer.lr=0.003",
    "training.scheduler.name=none",
    "training.augment.shift=0",
    "attack=[]",
)


def save_cached_model(overrides: tuple[str, ...], target: Path, cache: Path) -> Path:
    """Train (or take from the session's weight cache) a model through the runner's own path; save it."""
    from robustcnn.config import compose
    from robustcnn.device import resolve_device
    from robustcnn.jobs.inputs import load_data, to_container
    from robustcnn.jobs.trained import obtain_model

    config = to_container(compose([*overrides, f"paths.cache_dir={cache}"]))
    trained = obtain_model(config, load_data(config), resolve_device("cpu"), progress=False)
    state = {k: v.detach().contiguous() for k, v in trained.model.state_dict().items()}
    save_file(state, str(target), metadata={"robustcnn.model": "lenet5"})
    return target


@pytest.mark.slow
def test_gate_passes_for_the_adversarially_trained_lenet_and_fails_for_the_undefended(
    isolated: dict, session_models: Path
) -> None:
    """Issue 7's acceptance: gate 0.5 at eps 0.3 under the audit defaults: exit 0 (PGD-AT), 1 (standard)."""
    root, cache = isolated["root"], session_models / "weights"
    defended = save_cached_model(PGD_AT, root / "lenet5_pgd_at.safetensors", cache)
    undefended = save_cached_model(("attack=[]",), root / "lenet5.safetensors", cache)
    gate = ("audit.n_samples=300", "threat.eps=[0,0.1,0.3]", "audit.min_robust_accuracy=0.5")
    passed = cli(str(defended), *gate, cwd=root, timeout=1800)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "verdict=robust" in passed.stdout and "gate=passed" in passed.stdout
    failed = cli(str(undefended), *gate, cwd=root, timeout=1800)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "verdict=not_robust" in failed.stdout and "gate=failed" in failed.stdout
